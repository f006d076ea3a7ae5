"""Reward-model scoring throughput: conversations batched by length against batched in arrival order.

    .venv/bin/python bench/reward_scoring.py            # prints a Markdown table; see bench/README.md
    .venv/bin/python bench/reward_scoring.py --quick    # a smaller set, for a smoke run

The score stage hands `alignment.rewards.reward_model_scores` every sample of the round, K per prompt in prompt
order. Rejection-sampled responses are skewed in length (most short, a few long), so a batch in arrival order
usually holds one long response and pads everything else to it. The reward model is a random-weight Llama
sequence classifier (hidden 256, 4 layers) saved to a temporary folder; both orders score the same
conversations in the same process after a warm-up, and the table also reports how far the two orders' scores
differ (padding must not change a score) and the share of padding tokens each order computes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.chat import build_tokenizer  # noqa: E402
from alignment.rewards import reward_model_scores  # noqa: E402


def skewed_conversations(prompts: int, k: int, seed: int = 0) -> list[list[dict]]:
    """K responses per prompt: 85% of 10-40 characters, 15% of 300-600 (the character tokenizer: one per token)."""
    rng = random.Random(seed)
    out = []
    for i in range(prompts):
        for _ in range(k):
            length = rng.randint(300, 600) if rng.random() < 0.15 else rng.randint(10, 40)
            text = "".join(rng.choice("0123456789 +-=abc") for _ in range(length))
            out.append([{"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
                        {"role": "assistant", "content": text}])
    return out


def reward_model(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=1024))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def padding_share(lengths: list[int], batch_size: int, sort: bool) -> float:
    order = sorted(lengths) if sort else lengths
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    computed = sum(max(b) * len(b) for b in batches)
    return 1 - sum(lengths) / computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 prompts instead of 256")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    convs = skewed_conversations(64 if args.quick else 256, k=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = reward_model(Path(tmp) / "rm")
        tok = build_tokenizer()
        lengths = [len(tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False).input_ids)
                   for c in convs]
        reward_model_scores(path, convs[:64], args.batch_size)  # warm-up: first-call allocations
        rows, scores = [], {}
        for sort in (False, True):
            start = time.perf_counter()
            scores[sort] = reward_model_scores(path, convs, args.batch_size, sort_by_length=sort)
            wall = time.perf_counter() - start
            rows.append((sort, wall, len(convs) / wall, sum(lengths) / wall,
                         padding_share(lengths, args.batch_size, sort)))
    diff = max(abs(a - b) for a, b in zip(scores[False], scores[True]))
    print(f"{len(convs)} conversations, {sum(lengths)} tokens (median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}), batch size {args.batch_size}, {torch.get_num_threads()} threads\n")
    print("| batching | wall s | conversations/s | real tokens/s | padding share | speed-up |")
    print("|---|---|---|---|---|---|")
    base = rows[0][1]
    for sort, wall, cps, tps, pad in rows:
        name = "sorted by length" if sort else "arrival order"
        print(f"| {name} | {wall:.2f} | {cps:.1f} | {tps:.0f} | {pad:.0%} | {base / wall:.2f}x |")
    print(f"\nlargest score difference between the two orders: {diff:.2e}")


if __name__ == "__main__":
    main()
