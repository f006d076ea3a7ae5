"""Training throughput: SFT tokens per second with packing against padded batches on a length-skewed set, and DPO
step time with reference log-probabilities precomputed once against computing them at every step (full
fine-tuning and LoRA); peak memory of each; on a GPU, SFT's model FLOPs utilisation.

    .venv/bin/python bench/train_throughput.py              # CPU, 3.6M-parameter Llama; see bench/README.md
    python bench/train_throughput.py --model 1b             # GPU, ~1B-parameter Llama, bf16 mixed precision

Each case runs in a fresh process through the stages' own `build_trainer` (TRL underneath) on a random-weight
Llama. The SFT set is skewed as rejection-sampled data is: 85% short answers (10-30 tokens), 15% long ones
(200-500). Throughput counts real (non-padding) tokens at the steady rate, after the first 5 optimizer steps
(their warm-up, with flex_attention its compilation, is reported apart); DPO step time likewise, and the
reference pre-pass apart. Gradient checkpointing is on and attention is sdpa unless the flags say otherwise
(the tiny recipe only carries the other settings). Peak memory is the process's maximum resident set size and,
on a GPU, the most GPU memory PyTorch allocated.

Model FLOPs utilisation (GPU only) counts 6 FLOPs per parameter of every matrix multiply (lm_head included) per
real token, leaves attention's own FLOPs out (short packed examples attend over few tokens), and is measured
after the first 5 optimizer steps, against the GPU's dense bf16 peak (`--peak-tflops`, 989 for an H100 SXM).
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
sys.path.insert(0, str(ROOT / "bench"))
# Per model: its shape and the sizes of the cases. `1b` is Llama-3.2-1B-like in depth and width (16 layers,
# hidden 2048, MLP 8192, head dim 128) with the project's ~110-token vocabulary: 1.07B parameters.
MODELS = {
    "small": {"shape": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
              "sft_rows": 512, "max_length": 640, "padded_batch": 16, "packed_batch": 2,
              "dpo_pairs": 128, "dpo_batch": 8},
    "1b": {"shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16),
           "sft_rows": 8192, "max_length": 2048, "padded_batch": 32, "packed_batch": 4,
           "dpo_pairs": 1024, "dpo_batch": 16},
    # bench/llama_shape.py's shapes: Llama 3.2 1B's (1.24B parameters, its 128256-token vocabulary and 8 key-value
    # heads), and its 2-layer stand-in for CPU smoke runs; sized for bench/gpu_check.py's time box.
    "llama3.2-1b": {"llama_shape": "llama3.2-1b", "sft_rows": 2048, "max_length": 2048, "padded_batch": 32,
                    "packed_batch": 4, "dpo_pairs": 256, "dpo_batch": 16},
    "tiny-llama3": {"llama_shape": "tiny-llama3", "sft_rows": 64, "max_length": 128, "padded_batch": 8,
                    "packed_batch": 2, "dpo_pairs": 16, "dpo_batch": 2},
}
WARM_STEPS = 5
LORA = "{r: 16, lora_alpha: 32, lora_dropout: 0.0}"


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


def matmul_params(model) -> int:
    """Parameters that take part in a matrix multiply per token: every Linear weight, lm_head included (tied to
    the embedding here, so the embedding lookup is not counted twice)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def run_case(case: dict) -> dict:
    import torch

    from alignment.chat import build_tokenizer, token_ids
    from alignment.config import load_recipe
    from alignment.tiny_models import random_llama

    import llama_shape  # bench/, beside this file

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(2)
    spec, stage = MODELS[case["model"]], case["stage"]
    batch = spec["dpo_batch"] if stage == "dpo" else spec["packed_batch" if case["packing"] else "padded_batch"]
    # eval.lm_eval_tasks=[]: the recipe only carries training settings here; no lm-eval needed.
    overrides = ["eval.lm_eval_tasks=[]"] + [f"{stage}.{c}" for c in (
        "report_to=[]", "num_train_epochs=1", "logging_steps=1000", "save_steps=100000",
        f"max_length={spec['max_length']}", f"per_device_train_batch_size={batch}")]
    if stage == "sft":
        overrides.append(f"sft.packing={str(case['packing']).lower()}")
    else:  # the same trainer either way; without precomputing, the reference runs at every step
        overrides.append(f"dpo.precompute_ref_log_probs={str(case['precompute']).lower()}")
    if case.get("lora"):
        overrides.append(f"{stage}.lora={LORA}")
    overrides += [f"{stage}.gradient_checkpointing={str(case['gradient_checkpointing'] == 'on').lower()}",
                  f"{stage}.attn_implementation={case['attn_implementation']}"]
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", overrides)
    cfg = getattr(recipe, stage)
    if problems := cfg.machine_problems(stage):  # e.g. --attn flex_attention on a CPU: say so, not a traceback
        sys.exit("\n".join(problems))

    def model():  # what load_for_training gives the stage, from random weights instead of a checkpoint
        if "llama_shape" in spec:
            m = llama_shape.causal_lm(spec["llama_shape"], tok, seed=0)
        else:
            m = random_llama(tok, seed=0, **spec["shape"])
        m.set_attn_implementation(cfg.attn_implementation)
        return m

    # a Llama 3 sized vocabulary needs a tokenizer that decodes every id (bench/llama_shape.py)
    tok = llama_shape.tokenizer() if "llama_shape" in spec else build_tokenizer()
    policy = model()
    work = Path(case["work"])
    rows = skewed_rows(spec["sft_rows"] if stage == "sft" else spec["dpo_pairs"])
    start = time.time()
    if stage == "sft":
        from alignment.stages.sft import build_trainer

        trainer = build_trainer(recipe, policy, tok, rows, work)
    else:
        from alignment.stages import dpo

        # Run at every step, full fine-tuning's reference is a second model (the SFT model); with LoRA it is the
        # policy with its adapters switched off, as in the stage.
        ref_model = model() if not case["precompute"] and not case.get("lora") else None
        trainer = dpo.build_trainer(recipe, policy, tok, rows, work, ref_model=ref_model)
    setup = time.time() - start  # for DPO with a precomputed reference: the pre-pass (TRL runs it here)
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):  # wall time at the end of every optimizer step, for a steady-state rate
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = StepClock()
    trainer.add_callback(clock)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    steps = trainer.state.global_step
    key = "completion" if stage == "sft" else "chosen"
    tokens = sum(len(token_ids(tok, r["prompt"] + r[key])) for r in rows)
    if stage == "dpo":
        tokens += sum(len(token_ids(tok, r["prompt"] + r["rejected"])) for r in rows)
    result = {"seconds": out.metrics["train_runtime"], "steps": steps, "tokens": tokens, "setup_seconds": setup,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "matmul_params": matmul_params(policy)}
    if len(clock.times) > WARM_STEPS + 1:  # steady state: after the first optimizer steps (kernels warmed up)
        result["steady_seconds"] = clock.times[-1] - clock.times[WARM_STEPS - 1]
    result["loop_seconds"] = clock.times[-1] - t0 if clock.times else None
    if cuda:
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    return result


CASES = [
    {"name": "sft padded", "stage": "sft", "packing": False},
    {"name": "sft packed", "stage": "sft", "packing": True},
    {"name": "dpo precomputed", "stage": "dpo", "precompute": True},
    {"name": "dpo every step", "stage": "dpo", "precompute": False},
    {"name": "dpo lora precomputed", "stage": "dpo", "precompute": True, "lora": True},
    {"name": "dpo lora every step", "stage": "dpo", "precompute": False, "lora": True},
]


def steady(r: dict) -> tuple[float, float]:
    """(real tokens per second, seconds per optimizer step) after the first WARM_STEPS steps: kernel warm-up and
    compilation (minutes for flex_attention) are paid once per run and left out; they are reported apart."""
    steps = r["steps"] - WARM_STEPS
    return r["tokens"] * steps / r["steps"] / r["steady_seconds"], r["steady_seconds"] / steps


def table(results: dict, settings: dict) -> str:
    """Markdown tables of whatever cases `results` holds."""
    spec = MODELS[settings["model"]]
    gpu = any("peak_gpu_gib" in r for r in results.values())
    note = f"gradient checkpointing {settings['gradient_checkpointing']}, attention {settings['attn_implementation']}"

    def row(*cells) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    def mem(r) -> list:
        return [f"{r['peak_rss_mib']:.0f}"] + ([f"{r['peak_gpu_gib']:.1f}"] if gpu else [])

    mem_head = ["peak RSS MiB"] + (["peak GPU GiB"] if gpu else [])
    lines = []
    sft = {k: results[k] for k in ("sft padded", "sft packed") if k in results}
    if sft:
        params = next(iter(sft.values()))["matmul_params"] / 1e6
        head = [f"SFT, {spec['sft_rows']} length-skewed examples, {params:.0f}M parameters, {note}", "tokens/s",
                "steps", "warm-up s", *mem_head, *(["MFU"] if gpu else [])]
        lines += [row(*head), row("---", *["---:"] * (len(head) - 1))]
        labels = {"sft padded": f"padded batches of {spec['padded_batch']}",
                  "sft packed": f"packed rows of {spec['max_length']} tokens, {spec['packed_batch']} per batch"}
        for name, r in sft.items():
            rate = steady(r)[0]
            mfu = [f"{100 * 6 * r['matmul_params'] * rate / (settings['peak_tflops'] * 1e12):.1f}%"] if gpu else []
            lines.append(row(labels[name], f"{rate:.0f}", r["steps"], f"{r['loop_seconds'] - r['steady_seconds']:.1f}",
                             *mem(r), *mfu))
        if len(sft) == 2:
            speedup = steady(sft["sft packed"])[0] / steady(sft["sft padded"])[0]
            lines.append(row("**packed / padded**", f"**{speedup:.2f}x**", *[""] * (len(head) - 2)))
        lines.append("")
    for kind, label in (("dpo", "full fine-tuning"), ("dpo lora", "LoRA r=16")):
        pre, every = results.get(f"{kind} precomputed"), results.get(f"{kind} every step")
        if not (pre or every):
            continue
        head = [f"DPO {label}, {spec['dpo_pairs']} pairs, batches of {spec['dpo_batch']}, {note}", "s per step",
                "reference pre-pass s", *mem_head]
        lines += [row(*head), row("---", *["---:"] * (len(head) - 1))]
        if pre:
            lines.append(row("reference log-probs precomputed once", f"{steady(pre)[1]:.3f}",
                             f"{pre['setup_seconds']:.1f}", *mem(pre)))
        if every:
            lines.append(row("reference model run at every step", f"{steady(every)[1]:.3f}", "-", *mem(every)))
        if pre and every:
            lines.append(row("**precomputed / every step**", f"**{steady(pre)[1] / steady(every)[1]:.2f}x**",
                             *[""] * (len(head) - 2)))
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print("RESULT " + json.dumps(run_case(json.loads(sys.argv[2]))))
        return
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--only", nargs="*", choices=[c["name"] for c in CASES], help="run just these cases")
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                    help="the stages' gradient_checkpointing (default on, as TRL and the production recipes)")
    ap.add_argument("--attn", dest="attn_implementation", default="sdpa", choices=["sdpa", "eager",
                    "flex_attention", "flash_attention_2"], help="the stages' attn_implementation")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--json", type=Path, help="write the settings and every case's raw measurements here")
    ap.add_argument("--from-json", type=Path, help="print the tables of a saved --json file; run nothing")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(table(saved["results"], {**saved["settings"], "peak_tflops": args.peak_tflops}))
        return
    settings = {"model": args.model, "attn_implementation": args.attn_implementation,
                "gradient_checkpointing": args.gradient_checkpointing, "peak_tflops": args.peak_tflops}
    results = {}
    for case in CASES:
        if args.only and case["name"] not in args.only:
            continue
        with tempfile.TemporaryDirectory() as work:
            spec = {**case, **settings, "work": work}
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)],
                                  capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"case {case['name']} failed:\n{proc.stderr[-3000:]}")
        results[case["name"]] = r = json.loads(line[7:])
        print(f"  {case['name']:<22} {r}", file=sys.stderr, flush=True)
        if args.json:  # after every case, so a run stopped part-way keeps what it measured
            args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    print(table(results, settings))


if __name__ == "__main__":
    main()
