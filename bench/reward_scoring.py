"""Reward-model scoring throughput: conversations batched by length against batched in arrival order.

    .venv/bin/python bench/reward_scoring.py            # prints a Markdown table; see bench/README.md
    .venv/bin/python bench/reward_scoring.py --quick    # a smaller set, for a smoke run
    python bench/reward_scoring.py --model llama3.2-1b --json FILE   # bench/gpu_check.py's part: a Llama 3.2 1B
                                                        # shaped classifier (bf16 on a GPU), raw figures to FILE

The score stage hands `alignment.rewards.reward_model_scores` every sample of the round, K per prompt in prompt
order. Rejection-sampled responses are skewed in length (most short, a few long), so a batch in arrival order
usually holds one long response and pads everything else to it. The reward model is a random-weight Llama
sequence classifier (hidden 256, 4 layers) saved to a temporary folder; both orders score the same
conversations in the same process after a warm-up, and the table also reports how far the two orders' scores
differ (padding must not change a score) and the share of padding tokens each order computes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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


def reward_model(folder: Path, shape: str = "small") -> str:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if shape != "small":  # bench/llama_shape.py's shapes, saved in bf16 as a Llama checkpoint ships
        import llama_shape

        tok = llama_shape.tokenizer()
        device = "cuda" if torch.cuda.is_available() else None
        llama_shape.save(llama_shape.reward_model(shape, tok, device=device), tok, folder)
        return str(folder)
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


def fp32_agreement(path: str, convs: list[list[dict]], scores: list[float], k: int, batch_size: int) -> dict:
    """The model scored in fp32 against the scores given (the stage's RewardModel: bf16 on a GPU): the largest
    difference, and the share of prompts whose best of K responses is the same response in both."""
    from alignment.rewards import RewardModel

    rm = RewardModel(path, batch_size)
    rm.model = rm.model.float()
    ref = rm(convs)
    best = lambda xs: [max(range(k), key=lambda j: xs[i + j]) for i in range(0, len(xs), k)]  # noqa: E731
    return {"conversations": len(convs), "max_abs_diff": max(abs(a - b) for a, b in zip(ref, scores)),
            "score_range_fp32": [min(ref), max(ref)],
            "same_best_of_k_share": sum(a == b for a, b in zip(best(ref), best(scores))) / (len(convs) // k)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 prompts instead of 256")
    ap.add_argument("--prompts", type=int, help="prompts (x 4 responses); overrides --quick")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="small", choices=["small", "llama3.2-1b", "tiny-llama3"],
                    help="small: hidden 256, 4 layers; else a bench/llama_shape.py shape")
    ap.add_argument("--fp32-check", type=int, default=0, metavar="N",
                    help="also score the first N conversations in fp32 and compare (bf16 on a GPU)")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    k = 4
    convs = skewed_conversations(args.prompts or (64 if args.quick else 256), k=k)
    with tempfile.TemporaryDirectory() as tmp:
        build_start = time.perf_counter()
        path = reward_model(Path(tmp) / "rm", args.model)
        build_s = time.perf_counter() - build_start
        tok = build_tokenizer()
        lengths = [len(tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False).input_ids)
                   for c in convs]
        reward_model_scores(path, convs[:64], args.batch_size)  # warm-up: first-call allocations
        from alignment.rewards import RewardModel

        load_start = time.perf_counter()  # each timed call below loads the model too: this is that share
        RewardModel(path, args.batch_size).close()
        load_s = time.perf_counter() - load_start
        rows, scores = [], {}
        for sort in (False, True):
            start = time.perf_counter()
            scores[sort] = reward_model_scores(path, convs, args.batch_size, sort_by_length=sort)
            wall = time.perf_counter() - start
            rows.append((sort, wall, len(convs) / wall, sum(lengths) / wall,
                         padding_share(lengths, args.batch_size, sort)))
        agreement = (fp32_agreement(path, convs[:args.fp32_check - args.fp32_check % k], scores[True][
            :args.fp32_check - args.fp32_check % k], k, args.batch_size) if args.fp32_check >= k else None)
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
    if agreement:
        print(f"against fp32 on {agreement['conversations']} conversations: largest difference "
              f"{agreement['max_abs_diff']:.3g} (fp32 scores {agreement['score_range_fp32'][0]:.3g} to "
              f"{agreement['score_range_fp32'][1]:.3g}), same best of {k}: {agreement['same_best_of_k_share']:.0%}")
    if args.json:
        gpu = torch.cuda.is_available()
        args.json.write_text(json.dumps({
            "model": args.model, "dtype": "bfloat16" if gpu else "float32", "device":
            torch.cuda.get_device_name() if gpu else "cpu", "batch_size": args.batch_size, "conversations": len(convs),
            "tokens": sum(lengths), "model_build_and_save_s": build_s,
            "model_load_s_in_each_wall": load_s, "max_order_score_diff": diff,
            "cases": [{"sorted_by_length": s, "wall_s": w, "conversations_per_s": c, "real_tokens_per_s": t,
                       "padding_share": p} for s, w, c, t, p in rows],
            "fp32_agreement": agreement}, indent=1))


if __name__ == "__main__":
    main()
