"""Eval-stage time per model by backend, and reward scoring with the model loaded once against once per call.

    .venv/bin/python bench/eval_backends.py [--prompts 50] [--samples 4]   # Markdown tables; raw JSON in bench/results/
    python bench/eval_backends.py --model-path DIR --backends transformers,vllm --json FILE   # one model, timed

With `--model-path` (bench/gpu_check.py's part), each backend serves that one model for the eval stage's greedy
requests (`alignment.stages.eval`'s own request building, serving settings and shards; no lm-eval, no samples),
with engine start, generation and stop timed apart: generated tokens per second, and the share of prompts whose
greedy answer equals the first backend's.

Each backend runs in a fresh process on three random-weight Llamas of the tiny recipe's shape (input, sft, dpo),
the tiny recipe's first held-out prompts, greedy answers plus `--samples` sampled ones per prompt, and its
lm-eval task on the same prompts, through the engine that wrote the answers. A model's time is
`alignment.stages.eval.answers`: engine start, generation, lm-eval and engine stop, as in the stage, where the
three models are served one after another. Reward scoring: a random Llama classifier (hidden 256, 4 layers)
scores the answers of 3 models x (greedy + samples), loaded once (the stage now) or once per call (the stage
before: 2 calls per model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
ENGINE = "{gpu_memory_utilization: 0.3, max_model_len: 256, enforce_eager: true, enable_chunked_prefill: false}"
MODELS = ("input", "sft", "dpo")


def child(backend: str, folder: Path, prompts: int, samples: int, models: int) -> dict:
    """One backend's eval of the three models, in this process."""
    from alignment.config import load_recipe
    from alignment.prompts import read_prompts
    from alignment.stage_table import StageConfig, stage_config
    from alignment.stages import eval as eval_stage

    recipe = load_recipe(ROOT / "recipes/tiny.yaml", [
        f"eval.backend={backend}", f"eval.engine={ENGINE}", f"eval.num_prompts={prompts}",
        f"eval.lm_eval_limit={prompts}", f"eval.num_samples={samples}", "eval.pass_k=[1]"])
    cfg = StageConfig("eval", stage_config(recipe, "eval"))
    rows = read_prompts(ROOT / "data/arithmetic/eval.jsonl")[:prompts]
    out, stage_dir = {}, folder / f"out-{backend}"
    stage_dir.mkdir()
    for name in MODELS[:models]:
        start = time.time()
        greedy, _, lm = eval_stage.answers(cfg, folder / name, rows, stage_dir)
        out[name] = {"seconds": round(time.time() - start, 1), "lm_eval_exact_match": lm[
            "lm_eval/arithmetic_local/exact_match,final_answer"], "greedy_texts": [c.text for c in greedy]}
    return out


def timed_child(backend: str, model: Path, folder: Path, prompts: int, max_new_tokens: int, engine: str,
                batch_size: int) -> dict:
    """One backend's greedy eval requests for one model, as `eval_stage.answers` sends them, timed by phase."""
    from alignment.backends import make_requests, open_backend, send
    from alignment.config import load_recipe
    from alignment.prompts import read_prompts
    from alignment.seeding import model_identity
    from alignment.stage_table import StageConfig, stage_config
    from alignment.stages import eval as eval_stage

    recipe = load_recipe(ROOT / "recipes/tiny.yaml", [
        f"eval.backend={backend}", f"eval.engine={engine}", f"eval.max_new_tokens={max_new_tokens}",
        f"eval.batch_size={batch_size}", "eval.lm_eval_tasks=[]", "eval.num_samples=0"])
    cfg = StageConfig("eval", stage_config(recipe, "eval"))
    rows = read_prompts(ROOT / "data/arithmetic/eval.jsonl")[:prompts]
    ids, greedy = make_requests([r["messages"] for r in rows], model_identity(str(model)),
                                eval_stage.settings(cfg, 1, 0.0), cfg.seed)
    done, out = {}, folder / f"timed-{backend}"
    out.mkdir()
    t0 = time.perf_counter()
    with open_backend(eval_stage.serving(cfg), str(model), out) as engine_:
        t1 = time.perf_counter()
        send(engine_, greedy, done, out / "shards")
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    answers = [done[rid]["completions"][0] for rid in ids]  # [text, tokens (stop token not counted), finish]
    tokens = sum(a[1] for a in answers)
    return {"start_s": t1 - t0, "generate_s": t2 - t1, "stop_s": t3 - t2, "prompts": len(rows),
            "max_new_tokens": max_new_tokens, "generated_tokens": tokens, "tokens_per_s": tokens / (t2 - t1),
            "hit_token_limit": sum(a[2] == "length" for a in answers), "greedy_texts": [a[0] for a in answers]}


def compare(texts: dict[str, list[str]]) -> dict:
    """Per backend against the first: the share of prompts with the same greedy answer, and the mean share of the
    first backend's answer (in characters) that the two share as a prefix."""
    (ref_name, ref), out = next(iter(texts.items())), {}
    for name, xs in texts.items():
        prefix = [len(os.path.commonprefix([a, b])) / max(len(a), 1) for a, b in zip(ref, xs)]
        out[name] = {"against": ref_name, "equal_share": sum(a == b for a, b in zip(ref, xs)) / len(ref),
                     "mean_common_prefix_share": sum(prefix) / len(prefix)}
    return out


def timed_main(a) -> None:
    results = {"model": str(a.model_path), "prompts": a.prompts, "max_new_tokens": a.max_new_tokens,
               "engine": a.engine, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in a.backends.split(","):
            cmd = [sys.executable, __file__, "--timed-child", backend, "--model-path", str(a.model_path), "--folder",
                   tmp, "--prompts", str(a.prompts), "--max-new-tokens", str(a.max_new_tokens), "--engine", a.engine,
                   "--batch-size", str(a.batch_size)]
            start = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{backend} failed:\n{proc.stderr[-3000:]}")
            results["backends"][backend] = {"process_s": time.time() - start, **json.loads(line[0][len("RESULT "):])}
    results["greedy_agreement"] = compare({b: r["greedy_texts"] for b, r in results["backends"].items()})
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"Greedy eval requests, {a.prompts} prompts x {a.max_new_tokens} tokens, {a.model_path}:\n")
    print("| backend | start s | generate s | stop s | tokens/s | equal to first | common prefix |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b, r in results["backends"].items():
        g = results["greedy_agreement"][b]
        print(f"| {b} | {r['start_s']:.1f} | {r['generate_s']:.2f} | {r['stop_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{g['equal_share']:.0%} | {g['mean_common_prefix_share']:.0%} |")


def reward_scoring(folder: Path, prompts: int, samples: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignment.chat import build_tokenizer
    from alignment.rewards import RewardModel, reward_model_scores

    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_labels=1, pad_token_id=tok.pad_token_id)).save_pretrained(folder / "rm")
    tok.save_pretrained(folder / "rm")
    calls = [[[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]
              for i in range(prompts * n)] for _ in MODELS for n in (1, samples)]  # greedy, then sampled
    start = time.time()
    per_call = [reward_model_scores(str(folder / "rm"), c, 32) for c in calls]
    per_call_s = time.time() - start
    start = time.time()
    rm = RewardModel(str(folder / "rm"), 32)
    once = [rm(c) for c in calls]
    once_s = time.time() - start
    assert once == per_call  # the same scores either way
    return {"calls": len(calls), "conversations": sum(map(len, calls)), "loaded_per_call_s": round(per_call_s, 2),
            "loaded_once_s": round(once_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--backends", default="transformers,vllm,openai")
    p.add_argument("--models", type=int, default=3, help="how many of input, sft, dpo each backend evaluates")
    p.add_argument("--model-path", type=Path, help="evaluate this model folder only, timed by phase (above)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="with --model-path: eval.max_new_tokens")
    p.add_argument("--engine", default=ENGINE, help="eval.engine (vLLM settings) as a YAML/JSON mapping")
    p.add_argument("--batch-size", type=int, default=150, help="with --model-path: eval.batch_size (transformers)")
    p.add_argument("--json", type=Path, help="with --model-path: write the raw figures here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--timed-child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.timed_child:
        r = timed_child(a.timed_child, a.model_path, Path(a.folder), a.prompts, a.max_new_tokens, a.engine,
                        a.batch_size)
        print("RESULT " + json.dumps(r))
        return
    if a.model_path:
        timed_main(a)
        return
    if a.child:
        print("RESULT " + json.dumps(child(a.child, Path(a.folder), a.prompts, a.samples, a.models)))
        return
    from alignment.chat import build_tokenizer
    from alignment.tiny_models import random_llama, save

    results = {"machine": f"{platform.node()}: CPU only, shared with other jobs while measured",
               "prompts": a.prompts, "samples": a.samples, "models": a.models, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tok = build_tokenizer()
        for i, name in enumerate(MODELS):
            save(random_llama(tok, seed=i, **SHAPE), tok, folder / name)
        for backend in a.backends.split(","):
            start = time.time()
            proc = subprocess.run([sys.executable, __file__, "--child", backend, "--folder", tmp, "--prompts",
                                   str(a.prompts), "--samples", str(a.samples), "--models", str(a.models)],
                                  capture_output=True, text=True,
                                  cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{backend} failed:\n{proc.stderr[-3000:]}")
            results["backends"][backend] = {"process_s": round(time.time() - start, 1),
                                            **json.loads(line[0][len("RESULT "):])}
        results["reward_scoring"] = reward_scoring(folder, a.prompts, a.samples)
    names = MODELS[:a.models]
    texts = {b: [r[m]["greedy_texts"] for m in names] for b, r in results["backends"].items()}
    results["greedy_answers_equal_across_backends"] = len({json.dumps(t) for t in texts.values()}) == 1
    out = ROOT / "bench/results/eval-backends-cpu.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"Eval stage, {a.prompts} prompts x (greedy + {a.samples} samples) + lm-eval, per model "
          f"({results['machine']}):\n")
    print("| backend | " + " | ".join(f"{m} s" for m in names) + " | process s |")
    print("|---" * (len(names) + 2) + "|")
    for b, r in results["backends"].items():
        print(f"| {b} | " + " | ".join(str(r[m]["seconds"]) for m in names) + f" | {r['process_s']} |")
    print(f"\ngreedy answers equal across backends: {results['greedy_answers_equal_across_backends']}")
    rs = results["reward_scoring"]
    print(f"\nReward scoring, {rs['calls']} calls, {rs['conversations']} conversations: loaded per call "
          f"{rs['loaded_per_call_s']} s, loaded once {rs['loaded_once_s']} s")


if __name__ == "__main__":
    main()
