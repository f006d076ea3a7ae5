"""Llama 3's data side on the tiny recipe: three sources over three rounds, SFT from the previous model and from the
base model (issue 25's acceptance run).

The prompts are a mixture of two sources with a capability each (arithmetic, `math`, weight 0.6; word problems,
`word`, weight 0.4, re-tuned to 0.2 in round 3), every round's SFT set adds every earlier round's rows
(`sft.accumulate: all`, deduplicated by content) and a curated SFT file (`curated`, reference solutions written by
the task's own solver), and the held-out set mixes both capabilities, so eval reports accuracy per capability
with its interval. Rounds 1..R run with `sft.init: previous`; then the same run folder, copied, runs them again
with `sft.init: base` (round 1's data is the same; its SFT and what follows rerun).

Printed and written to bench/results/data-mix-seed<seed>.json: per round and init, the prompts drawn per source
against the quota, the SFT rows per source (this round's, each earlier round's, the curated file) and in all, and
held-out accuracy per capability with 95% intervals.

    .venv/bin/python bench/data_mix.py --out runs/data-mix [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.config import load_recipe  # noqa: E402
from alignment.metrics import fmt_ci  # noqa: E402
from alignment.prompts import read_jsonl, write_jsonl  # noqa: E402
from alignment.tasks.arithmetic import solution  # noqa: E402


def inputs(out: Path) -> list[str]:
    """The held-out mix and the curated file, written once, and the overrides that use them."""
    out.mkdir(parents=True, exist_ok=True)
    held_out = ([{**r, "capability": "math"} for r in read_jsonl(ROOT / "data/arithmetic/eval.jsonl")[:150]]
                + [{**r, "capability": "word"} for r in read_jsonl(ROOT / "data/word_problems/eval.jsonl")[:100]])
    write_jsonl(out / "eval-mix.jsonl", held_out)
    curated = []  # the last 100 training questions (a round draws from 8000), answered by the task's solver
    for r in read_jsonl(ROOT / "data/arithmetic/train.jsonl")[-100:]:
        a, op, b = r["messages"][0]["content"][len("What is "):-1].split()
        curated.append({"messages": [*r["messages"], {"role": "assistant", "content": solution(int(a), op, int(b))}]})
    write_jsonl(out / "curated.jsonl", curated)
    return ["prompts.train_path=null",
            "prompts.sources=[{source: {path: data/arithmetic/train.jsonl, capability: math}, weight: 0.6}, "
            "{source: {path: data/word_problems/train.jsonl, capability: word}, weight: 0.4, rounds: {3: {weight: 0.2}}}]",
            f"prompts.eval_path={out / 'eval-mix.jsonl'}", "sft.accumulate=all",
            f"sft.extra_sources=[{{path: {out / 'curated.jsonl'}, capability: curated}}]",
            # a word problem's prompt is up to ~100 tokens of the tiny character tokenizer; arithmetic's ~30
            "sft.max_length=256", "dpo.max_length=256", "reward_training.max_length=256"]


def run_round(n: int, runs: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "alignment.cli", "round", str(n), "--recipe", "recipes/tiny.yaml",
           f"runs_dir={runs}", *overrides]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")


def manifest(run: Path, n: int, stage: str) -> dict:
    return json.loads((run / f"round-{n}/{stage}/manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="runs_dir of both runs (previous/, base/)")
    ap.add_argument("--rounds", type=int, default=3)
    args, extra = ap.parse_known_args()
    overrides = inputs(args.out) + extra
    recipe = load_recipe("recipes/tiny.yaml", overrides)
    result = {"seed": recipe.seed, "overrides": overrides, "runs": {}}
    for init in ("previous", "base"):
        runs = args.out / init
        if init == "base" and not runs.exists():  # the same bootstrap and round-1 data as the previous-init run
            shutil.copytree(args.out / "previous", runs, ignore=shutil.ignore_patterns(".lock"))
        for n in range(1, args.rounds + 1):
            run_round(n, runs, [*overrides, f"sft.init={init}"])
        run = runs / recipe.name
        # which source each drawn prompt came from, by its id in the source files (not from the stage's own count)
        owner = {r["prompt_id"]: str(src) for src in recipe.prompts.train_sources for r in read_jsonl(src.path)}
        rows = []
        for n in range(1, args.rounds + 1):
            gen, sft = manifest(run, n, "generate"), manifest(run, n, "sft")
            metrics = json.loads((run / f"round-{n}/eval/metrics.json").read_text())
            rows.append({
                "round": n,
                "drawn_per_source": dict(Counter(owner[pid] for pid in {
                    r["prompt_id"] for r in read_jsonl(run / f"round-{n}/generate/samples.jsonl")})),
                "recorded_per_source": gen["stats"]["prompts_by_source"],
                "quota_per_source": dict(zip(map(str, recipe.prompts.train_sources), recipe.prompts.quotas(n))),
                "sft_rows_per_source": sft["stats"].get("sources"), "sft_examples": sft["rows"]["examples"],
                # rows select wrote in rounds 1..n, against those SFT kept: the difference repeated an earlier row
                "selected_so_far": sum(manifest(run, k, "select")["rows"]["sft"] for k in range(1, n + 1)),
                "sft_started_from": sft["inputs"]["model"]["path"],
                "accuracy": {m: {k: v for k, v in metrics[m].items() if k.startswith("accuracy")}
                             for m in ("input", "sft", "dpo")},
                "promoted": json.loads((run / f"round-{n}/promote/decision.json").read_text())["promoted"],
            })
        result["runs"][init] = rows

    path = ROOT / "bench/results" / f"data-mix-seed{recipe.seed}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for init, rows in result["runs"].items():
        print(f"\nsft.init: {init}\n")
        print("| round | drawn (quota) per source | SFT starts from | SFT examples: kept per source | repeats dropped "
              "| SFT: math | SFT: word | DPO: math | DPO: word | promoted |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            drawn = ", ".join(f"{Path(s).parent.name} {d} ({r['quota_per_source'][s]})"
                              for s, d in r["drawn_per_source"].items())
            sources = r["sft_rows_per_source"] or {}
            parts = ", ".join(f"{Path(k).stem if '/' in k else k} {v.get('used', v['rows'])}"
                              for k, v in sorted(sources.items()))
            kept = sum(v["rows"] for k, v in sources.items() if k.startswith("round"))
            start = Path(r["sft_started_from"])
            acc = lambda m, c: fmt_ci(r["accuracy"][m][f"accuracy/{c}"], r["accuracy"][m][f"accuracy/{c}_ci"])  # noqa
            print(f"| {r['round']} | {drawn} | {start.parent.name}/{start.name} | {r['sft_examples']}: {parts} | "
                  f"{r['selected_so_far'] - kept} | {acc('sft', 'math')} | {acc('sft', 'word')} | "
                  f"{acc('dpo', 'math')} | {acc('dpo', 'word')} | {r['promoted']} |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
