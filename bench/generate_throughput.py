"""Generate-stage throughput: output tokens per second of each backend, the stage against its raw engine, and
vLLM's K samples per request (n=K) against K separate requests on long prompts.

    .venv/bin/python bench/generate_throughput.py [--quick] [--prefix-sharing]   # a Markdown table; see bench/README.md

Every case runs in a fresh process (one engine at a time, all memory back between cases) on random-weight Llamas
built in code: `tiny` (the tiny recipe's shape, 0.1M parameters) and `100m` (hidden 768, 12 layers, 113M).
"Raw" calls the engine directly on the same conversations; "stage" runs `alignment.stages.generate.run`, which
adds request building, dedup, shard writes and samples.jsonl. Engine start-up and shut-down are excluded from
both (the stage's manifest reports them; vLLM takes about 5 s here to stop its engine process). Random
models rarely write <|eot_id|>, so nearly every sample runs to the token limit: the token counts are comparable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, intermediate, layers, heads (head size 32 or 64: vLLM's CPU kernels need >= 32)
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    "100m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
ENGINE = {"gpu_memory_utilization": 0.3, "max_model_len": 2048, "enforce_eager": True,
          "enable_chunked_prefill": False}


def build_model(shape: str, folder: Path) -> Path:
    from alignment.chat import build_tokenizer
    from alignment.tiny_models import random_llama, save

    path = folder / shape
    if not path.exists():
        tok = build_tokenizer()
        save(random_llama(tok, seed=0, max_position_embeddings=2048, **SHAPES[shape]), tok, path)
    return path


def conversations(n: int, long: bool = False) -> list[list[dict]]:
    rows = [json.loads(line) for line in open(ROOT / "data/arithmetic/train.jsonl")][:max(n, 100)]
    if not long:
        return [r["messages"] for r in rows[:n]]
    # ~1500-token prompts (one token per character), distinct from the first character on
    text = " ".join(r["messages"][0]["content"] for r in rows)[:1500]
    return [[{"role": "user", "content": f"{i}: {text}"}] for i in range(n)]


# --- one case, in its own process ------------------------------------------------------------------------------


def raw_transformers(model: Path, convs, k: int, tokens: int) -> dict:
    from alignment.backends.hf import load_policy, sample

    m, tok = load_policy(str(model))
    start = time.time()
    out = sample(m, tok, convs, num_samples=k, temperature=1.0, top_p=1.0, max_new_tokens=tokens,
                 batch_size=len(convs), seeds=list(range(len(convs))), desc="raw transformers")
    secs = time.time() - start
    # every generated token, the end-of-turn token included (vLLM's token_ids count it too)
    return {"tokens": sum(c.num_tokens + (c.finish_reason == "stop") for cs in out for c in cs), "seconds": secs}


def raw_vllm(model: Path, convs, k: int, tokens: int, separate: bool = False) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), **ENGINE)
    tok = llm.get_tokenizer()
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>")]  # as the stage asks
    if separate:  # K requests of one sample each, as an engine without n would be driven
        convs = [c for c in convs for _ in range(k)]
        params = [SamplingParams(n=1, temperature=1.0, max_tokens=tokens, seed=i, stop_token_ids=stop)
                  for i in range(len(convs))]
    else:
        params = [SamplingParams(n=k, temperature=1.0, max_tokens=tokens, seed=i, stop_token_ids=stop)
                  for i in range(len(convs))]
    start = time.time()
    outs = llm.chat(convs, params, use_tqdm=False)
    secs = time.time() - start
    return {"tokens": sum(len(c.token_ids) for o in outs for c in o.outputs), "seconds": secs}


def stage(model: Path, convs, k: int, tokens: int, backend: str, work: Path) -> dict:
    from alignment.config import load_recipe
    from alignment.stages import generate

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"b{i}", "messages": c}) + "\n"
                               for i, c in enumerate(convs)))
    overrides = [f"teacher.backend={backend}", "teacher.source=path", f"teacher.model_name_or_path={model}",
                 f"teacher.batch_size={len(convs)}", f"teacher.shard_size={len(convs)}",
                 f"teacher.engine={json.dumps(ENGINE)}", f"sampling.num_samples={k}",
                 f"sampling.max_new_tokens={tokens}", f"prompts.num_prompts={len(convs)}"]
    if backend == "openai":
        overrides += ["teacher.serve=true", f"teacher.max_concurrency={len(convs)}"]
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", overrides)
    out = work / f"stage-{backend}"
    out.mkdir()
    start = time.time()
    result = generate.run(recipe, {"prompts": prompts, "teacher": model}, out, round_n=1)
    wall = time.time() - start - result.stats["backend_start_seconds"] - result.stats["backend_stop_seconds"]
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    tokens_out = sum(r["num_tokens"] + (r["finish_reason"] == "stop") for r in rows)  # as raw: end token counts
    return {"tokens": tokens_out, "seconds": wall}


def run_case(case: dict) -> dict:
    work = Path(case["work"])
    model = build_model(case["shape"], work)
    convs = conversations(case["prompts"], long=case.get("long", False))
    k, tokens = case["k"], case["tokens"]
    if case["kind"] == "raw-transformers":
        return raw_transformers(model, convs, k, tokens)
    if case["kind"] == "raw-vllm":
        return raw_vllm(model, convs, k, tokens, separate=case.get("separate", False))
    with tempfile.TemporaryDirectory(dir=work) as d:
        return stage(model, convs, k, tokens, case["kind"].removeprefix("stage-"), Path(d))


# --- the table -------------------------------------------------------------------------------------------------


def cases(quick: bool, only_prefix: bool = False) -> list[dict]:
    out = []
    for shape, prompts, k, tokens in (("tiny", 512, 4, 16), ("100m", 16, 4, 32)):
        if (quick and shape == "100m") or only_prefix:
            continue
        for kind in ("raw-transformers", "stage-transformers", "raw-vllm", "stage-vllm", "stage-openai"):
            out.append({"shape": shape, "kind": kind, "prompts": prompts, "k": k, "tokens": tokens})
    for separate in (False, True):
        out.append({"shape": "tiny" if quick else "100m", "kind": "raw-vllm", "prompts": 8, "k": 8, "tokens": 16,
                    "long": True, "separate": separate})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--prefix-sharing", action="store_true", help="only n=K against K separate requests")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))))
        return
    results = []
    with tempfile.TemporaryDirectory() as work:
        for case in cases(args.quick, args.prefix_sharing):
            case["work"] = work
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                  text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"case {case} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(line[7:])
            results.append({**case, "out_tokens": r["tokens"], "seconds": r["seconds"],
                            "tok_s": r["tokens"] / r["seconds"]})
            print(f"  {case['shape']:>5} {case['kind']:<19} {r['tokens']:>6} tokens {r['seconds']:7.2f}s "
                  f"{r['tokens'] / r['seconds']:8.1f} tok/s", file=sys.stderr, flush=True)
    print(table(results))


def table(results: list[dict]) -> str:
    lines = ["| model | prompts x K x max tokens | engine | raw engine tok/s | stage tok/s | stage / raw |",
             "|---|---|---|---:|---:|---:|"]
    get = lambda shape, kind: next((r for r in results if r["shape"] == shape and r["kind"] == kind  # noqa: E731
                                    and not r.get("long")), None)
    for shape in SHAPES:
        for engine in ("transformers", "vllm", "openai"):
            raw, st = get(shape, f"raw-{engine}"), get(shape, f"stage-{engine}")
            if st is None and raw is None:
                continue
            ref = st or raw
            size = f"{ref['prompts']} x {ref['k']} x {ref['tokens']}"
            name = {"openai": "vLLM server (serve)", "vllm": "vLLM in-process", "transformers": "transformers"}
            ratio = f"{st['tok_s'] / raw['tok_s']:.2f}" if st and raw else "-"
            lines.append(f"| {shape} | {size} | {name[engine]} | {raw['tok_s']:.0f} | " if raw else
                         f"| {shape} | {size} | {name[engine]} | - | ")
            lines[-1] += f"{st['tok_s']:.0f} | {ratio} |" if st else "- | - |"
    long = [r for r in results if r.get("long")]
    if len(long) == 2:
        shared, separate = (next(r for r in long if r["separate"] is s) for s in (False, True))
        lines += ["", "| model | long prompts (~1500 tokens) x K x max tokens | n=K per request | K separate "
                  "requests | speed-up |", "|---|---|---:|---:|---:|",
                  f"| {shared['shape']} | {shared['prompts']} x {shared['k']} x {shared['tokens']} | "
                  f"{shared['seconds']:.2f} s | {separate['seconds']:.2f} s | "
                  f"{separate['seconds'] / shared['seconds']:.2f}x |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
