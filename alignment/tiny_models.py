"""Random-weight Llama models with the project's Llama 3 tokenizer: what the bootstrap pretrains, and what tests
and benchmarks load into every engine, since nothing can be downloaded.

    python -m alignment.tiny_models /tmp/llama-100m --hidden-size 768 --layers 12 --heads 12
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.chat import build_tokenizer


def llama_config(tokenizer, *, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, max_position_embeddings: int = 2048, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **extra)


def random_llama(tokenizer, *, seed: int, **shape) -> LlamaForCausalLM:
    """A Llama causal LM with seeded random weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tokenizer, **shape))


def save(model, tokenizer, path: Path) -> Path:
    """A save_pretrained folder any engine loads: weights, config, tokenizer and chat template."""
    model.save_pretrained(path)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # saved for generation: new tokens line up at the right edge
    tokenizer.save_pretrained(path)
    tokenizer.padding_side = side
    return Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description="save a random-weight Llama with the Llama 3 tokenizer")
    ap.add_argument("path", type=Path)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--intermediate-size", type=int, default=None, help="default: 4x hidden size")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = build_tokenizer()
    model = random_llama(tok, seed=a.seed, hidden_size=a.hidden_size, num_hidden_layers=a.layers,
                         intermediate_size=a.intermediate_size or 4 * a.hidden_size, num_attention_heads=a.heads)
    save(model, tok, a.path)
    print(f"{a.path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
