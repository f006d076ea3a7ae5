"""Training throughput: SFT tokens per second with packing against padded batches on a length-skewed set, and DPO
step time with reference log-probabilities precomputed once against computing them at every step; peak memory
of each.

    .venv/bin/python bench/train_throughput.py      # prints a Markdown table; see bench/README.md

Each case runs in a fresh process through the stages' own `build_trainer` (TRL underneath) on a random-weight
Llama (hidden 256, 4 layers, 3.6M parameters). The SFT set is skewed as rejection-sampled data is: 85% short
answers (10-30 tokens), 15% long ones (200-500). Throughput counts real (non-padding) tokens; time is the
trainer's own train_runtime, so start-up and the reference pre-pass are not in it (the pre-pass is reported
apart). Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)


def skewed_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(200, 500) if rng.random() < 0.15 else rng.randint(10, 30)
        text = "".join(rng.choice("0123456789 +-=") for _ in range(length))
        rows.append({"prompt": [{"role": "user", "content": f"Question {i}?"}],
                     "completion": [{"role": "assistant", "content": text}],
                     "chosen": [{"role": "assistant", "content": text}],
                     "rejected": [{"role": "assistant", "content": text[::-1]}]})
    return rows


def run_case(case: dict) -> dict:
    import torch

    from alignment.chat import build_tokenizer, token_ids
    from alignment.config import load_recipe
    from alignment.tiny_models import random_llama

    torch.set_num_threads(2)
    tok = build_tokenizer()
    model = random_llama(tok, seed=0, **SHAPE)
    work = Path(case["work"])
    rows = skewed_rows(case["rows"])
    common = ["report_to=[]", "num_train_epochs=1", "logging_steps=1000", "save_steps=100000", "max_length=640"]
    if case["stage"] == "sft":
        from alignment.stages.sft import build_trainer

        recipe = load_recipe(ROOT / "recipes/tiny.yaml", [f"sft.{c}" for c in common] + [
            f"sft.packing={str(case['packing']).lower()}", f"sft.per_device_train_batch_size={case['batch']}"])
        trainer = build_trainer(recipe, model, tok, rows, work)
    else:
        from alignment.stages import dpo

        recipe = load_recipe(ROOT / "recipes/tiny.yaml", [f"dpo.{c}" for c in common] + [
            f"dpo.per_device_train_batch_size={case['batch']}"])
        start = time.time()
        if case["precompute"]:
            trainer = dpo.build_trainer(recipe, model, tok, rows, work)
        else:  # the same trainer, with the reference run at every step
            from trl import DPOConfig

            original = DPOConfig.__init__

            def no_precompute(self, *a, **kw):
                kw["precompute_ref_log_probs"] = False
                original(self, *a, **kw)

            DPOConfig.__init__ = no_precompute
            trainer = dpo.build_trainer(recipe, model, tok, rows, work,
                                        ref_model=random_llama(tok, seed=0, **SHAPE))
        setup = time.time() - start
    out = trainer.train()
    steps = trainer.state.global_step
    tokens = sum(len(token_ids(tok, r["prompt"] + r["completion"])) for r in rows)
    result = {"seconds": out.metrics["train_runtime"], "steps": steps, "tokens": tokens,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if case["stage"] == "dpo":
        result["setup_seconds"] = setup
    return result


CASES = [
    {"name": "sft padded", "stage": "sft", "packing": False, "batch": 16, "rows": 512},
    {"name": "sft packed", "stage": "sft", "packing": True, "batch": 2, "rows": 512},
    {"name": "dpo precomputed reference", "stage": "dpo", "precompute": True, "batch": 8, "rows": 128},
    {"name": "dpo reference every step", "stage": "dpo", "precompute": False, "batch": 8, "rows": 128},
]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print("RESULT " + json.dumps(run_case(json.loads(sys.argv[2]))))
        return
    results = {}
    for case in CASES:
        with tempfile.TemporaryDirectory() as work:
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps({**case, "work": work})],
                                  capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"case {case['name']} failed:\n{proc.stderr[-3000:]}")
        results[case["name"]] = r = json.loads(line[7:])
        print(f"  {case['name']:<28} {r}", file=sys.stderr, flush=True)
    padded, packed = results["sft padded"], results["sft packed"]
    pre, every = results["dpo precomputed reference"], results["dpo reference every step"]
    lines = [
        "| SFT, 512 length-skewed examples (85% 10-30 tokens, 15% 200-500) | tokens/s | optimizer steps | peak RSS MiB |",
        "|---|---:|---:|---:|",
        f"| padded batches of 16 | {padded['tokens'] / padded['seconds']:.0f} | {padded['steps']} | "
        f"{padded['peak_rss_mib']:.0f} |",
        f"| packed rows of 640 tokens, 2 per batch (padding-free) | {packed['tokens'] / packed['seconds']:.0f} | "
        f"{packed['steps']} | {packed['peak_rss_mib']:.0f} |",
        f"| **packed / padded** | **{padded['seconds'] / packed['seconds']:.2f}x** | | |",
        "",
        "| DPO, 128 pairs, batches of 8 | s per step | reference pre-pass s | peak RSS MiB |",
        "|---|---:|---:|---:|",
        f"| reference log-probs precomputed once | {pre['seconds'] / pre['steps']:.3f} | "
        f"{pre['setup_seconds']:.1f} | {pre['peak_rss_mib']:.0f} |",
        f"| reference model run at every step | {every['seconds'] / every['steps']:.3f} | - | "
        f"{every['peak_rss_mib']:.0f} |",
        f"| **precomputed / every step** | **{(pre['seconds'] / pre['steps']) / (every['seconds'] / every['steps']):.2f}x** | | |",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
