"""DPO: preference-tune the round's SFT model on best-versus-worst pairs (TRL DPOTrainer).

Llama 3 settings by default: beta 0.1, and an NLL term on the chosen response with weight 0.2 (TRL's extra `sft`
loss). The reference model is the SFT model itself; its log-probabilities are computed once before training
(`precompute_ref_log_probs`), so no second model sits in memory during the steps.

    align stage dpo --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from alignment.config import InputError, Recipe
from alignment.prompts import read_jsonl
from alignment.stages.result import StageResult
from alignment.training import count_over_length, load_for_training, loss_summary, save_model, trainer_fields


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    rows = read_jsonl(inputs["pairs"])
    if not rows:
        raise InputError(f"{inputs['pairs']}: no preference pairs were selected; see the select stage's drop counts")
    cfg = recipe.dpo
    model, tokenizer = load_for_training(inputs["model"])
    over = count_over_length(tokenizer, rows, cfg.max_length, ("chosen", "rejected"))
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    args = DPOConfig(**trainer_fields(cfg, out_dir, recipe.seed), beta=cfg.beta, loss_type=list(cfg.loss_type),
                     loss_weights=list(cfg.loss_weights), precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    save_model(trainer, tokenizer, out_dir / "model")
    history = trainer.state.log_history
    stats = loss_summary(history)
    for key in ("rewards/margins", "rewards/accuracies"):
        stats.update({k: v for k, v in loss_summary(history, key).items() if k != "steps"})
    return StageResult(outputs={"model": "model", "log_history": "log_history.json", "logs": "logs"}, rows={"pairs": len(rows), "truncated": over}, stats=stats)
