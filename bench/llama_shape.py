"""Llama-3.2-1B-shaped random models and a tokenizer for them, built in code (nothing is downloaded): what
bench/gpu_check.py and the benchmarks it calls (train_throughput, reward_scoring, eval_backends) load.

The shape is meta-llama/Llama-3.2-1B-Instruct's config.json (commit 4e20de362430cd3b72f300e6b0f18e50e7166e08):
hidden 2048, 16 layers, 32 attention heads of 64, 8 key-value heads, MLP 8192, vocabulary 128256, RoPE theta
500000, RMSNorm eps 1e-5, input and output embeddings tied: 1.24B parameters. Its `rope_scaling` (llama3, factor
32) is left out: it changes positions beyond 8192 only, and these models see at most 2048.

The tokenizer is the project's own (`alignment.chat.build_tokenizer`: Llama 3's special tokens and chat template,
one token per printable character) with its vocabulary filled up to 128256 by plain tokens `<t{id}>` that text
never encodes to. A random model samples from all 128256 ids, and every one of them must decode to text: otherwise
vLLM and transformers would both return empty strings for the out-of-range ids and eval's "greedy answers equal"
would compare nothing. Encoded prompts and training rows are the project tokenizer's ids, unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA32_1B_VOCAB = 128256
SHAPES = {
    # Llama 3.2 1B (above). head_dim = 2048 / 32 = 64, as in its config.
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=LLAMA32_1B_VOCAB),
    # The CPU smoke run's stand-in: the same vocabulary and grouped-query attention, 2 layers. Head size 32:
    # vLLM's CPU attention kernels need at least 32.
    "tiny-llama3": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=LLAMA32_1B_VOCAB),
}
LLAMA3_EXTRA = dict(rope_theta=500000.0, rms_norm_eps=1e-5)  # Llama 3.2 1B's, where LlamaConfig's defaults differ


def tokenizer(vocab_size: int = LLAMA32_1B_VOCAB, folder: Path | None = None):
    """The project's tokenizer with its vocabulary filled to `vocab_size` (saved to `folder` when given)."""
    import tempfile

    from transformers import AutoTokenizer

    from alignment.chat import build_tokenizer

    base = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        state = json.loads((Path(tmp) / "tokenizer.json").read_text())
        vocab = state["model"]["vocab"]
        if len(vocab) > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the project tokenizer's {len(vocab)} tokens")
        vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size)})
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(state))
        tok = AutoTokenizer.from_pretrained(tmp)
    if len(tok) != vocab_size or tok.chat_template != base.chat_template:
        raise RuntimeError(f"filled tokenizer has {len(tok)} tokens (expected {vocab_size}) or lost its template")
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def config(shape: str, tok, *, max_position_embeddings: int = 2048, **extra):
    """A LlamaConfig of the named shape, with the tokenizer's special token ids (alignment.tiny_models's)."""
    from alignment.tiny_models import llama_config

    spec = dict(SHAPES[shape])
    vocab, kv = spec.pop("vocab_size"), spec.pop("num_key_value_heads")
    cfg = llama_config(tok, max_position_embeddings=max_position_embeddings, **spec, **LLAMA3_EXTRA, **extra)
    cfg.vocab_size, cfg.num_key_value_heads = vocab, kv  # llama_config sets both from its own arguments
    return cfg


def causal_lm(shape: str, tok, *, seed: int = 0, device: str | None = None):
    """A seeded random-weight LlamaForCausalLM of the shape (built on `device`: a GPU initialises 1B in a second)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(config(shape, tok))


def reward_model(shape: str, tok, *, seed: int = 0, device: str | None = None, max_position_embeddings: int = 2048):
    """A seeded random-weight LlamaForSequenceClassification with one label: the shape of a Llama reward model."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = config(shape, tok, max_position_embeddings=max_position_embeddings, num_labels=1)
    with torch.device(device or "cpu"):
        return LlamaForSequenceClassification(cfg)


def save(model, tok, folder: Path, dtype: str = "bfloat16") -> Path:
    """A save_pretrained folder (weights in `dtype`, as a Llama checkpoint ships) with the tokenizer, padding left
    for generation as alignment.tiny_models.save does."""
    import torch

    from alignment.tiny_models import save as save_tiny

    return save_tiny(model.to(getattr(torch, dtype)), tok, folder)


def params(model) -> dict:
    """Parameter counts: all (tied weights once) and those in matrix multiplies (every Linear, lm_head included),
    the count MFU uses (bench/train_throughput.py)."""
    import torch

    return {"parameters": sum(p.numel() for p in model.parameters()),
            "matmul_parameters": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))}
