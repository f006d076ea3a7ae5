"""An iterative post-training pipeline in the manner of Llama 3: generate, score, select, SFT, DPO, evaluate."""
