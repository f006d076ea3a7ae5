"""The code recipe's round in numbers: HumanEval and the task's held-out split per model (greedy pass@1, Wilson
intervals), what execution feedback added, and the gate's decision. Reads a finished round of
recipes/smollm2-135m-code.yaml and copies its raw metrics, decision and stage statistics into bench/results/.

    make round N=1 RECIPE=recipes/smollm2-135m-code.yaml
    .venv/bin/python bench/code_round.py runs/smollm2-135m-code [--out bench/results/code-round-seed0]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the recipe's run folder, e.g. runs/smollm2-135m-code")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/code-round-seed0"))
    args = ap.parse_args()
    r = args.run / f"round-{args.round}"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "answers.jsonl"):
        shutil.copy(r / "eval" / name, args.out / name)
    shutil.copy(r / "promote" / "decision.json", args.out / "decision.json")
    stages = {s: {k: manifest(r / s)[k] for k in ("rows", "stats", "wall_time_s")}
              for s in ("generate", "revise", "score", "select", "sft", "dpo", "eval")}
    (args.out / "stages.json").write_text(json.dumps(stages, indent=1) + "\n")

    metrics = json.loads((r / "eval" / "metrics.json").read_text())
    print("| model | HumanEval pass@1 (greedy, 164) | task held-out (60) | answers cut at the token limit |")
    print("|---|---|---|---|")
    for name, m in metrics.items():
        he, code = m["accuracy/humaneval"], m["accuracy/code"]
        lo, hi = m["accuracy/humaneval_ci"]
        clo, chi = m["accuracy/code_ci"]
        print(f"| {name} | {he:.3f} [{lo:.3f}, {hi:.3f}] ({round(he * 164)}/164) | {code:.3f} [{clo:.3f}, {chi:.3f}] "
              f"({round(code * 60)}/60) | {m['hit_token_limit_share']:.1%} |")
    rev, sel = stages["revise"]["stats"], stages["select"]["stats"]
    first = rev["first_try"]
    print(f"\nexecution feedback: {first['prompts_passed']} of {rev['prompts_with_code_tests']} prompts solved on the "
          f"first try ({first['samples_passed']} of {first['samples']} samples); {rev['revised_samples']} failing "
          f"samples revised, passed after turn 1: {rev['passed_after_turn']['1']}; SFT rows from revisions: "
          f"{sel['from_revisions']['sft_rows']} of {stages['select']['rows']['sft']}")
    decision = json.loads((r / "promote" / "decision.json").read_text())
    print(f"promoted: {decision['promoted']} on {decision['primary_metric']}")
    for reason in decision["reasons"]:
        print(f"  {reason}")
    print(f"raw results: {args.out}")


if __name__ == "__main__":
    main()
