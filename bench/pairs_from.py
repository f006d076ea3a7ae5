"""DPO on the teacher's pairs against DPO on the policy's own (`dpo.pairs_from`), same round, same seed.

Round 1 of the recipe runs as written (pairs from the teacher's samples) in <out>/samples; that run folder is copied
to <out>/policy, where round 1 runs again with dpo.pairs_from=policy: every stage up to SFT is up to date and
skipped, then policy_pairs, dpo, eval and promote run. Printed: held-out accuracy of both DPO models and of their
SFT model with 95% intervals, and the two DPO models compared on the same prompts (McNemar's exact test and its
interval). The raw figures go to bench/results/pairs-from-<recipe>-seed<seed>.json.

    .venv/bin/python bench/pairs_from.py --out runs/pairs-from [seed=1 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.config import load_recipe  # noqa: E402
from alignment.metrics import fmt_ci, mcnemar_exact, mcnemar_interval  # noqa: E402


def round1(recipe: str, runs: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "alignment.cli", "round", "1", "--recipe", recipe, f"runs_dir={runs}", *overrides]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")


def verified(run: Path, model: str) -> dict[str, bool]:
    rows = map(json.loads, (run / "round-1/eval/answers.jsonl").read_text().splitlines())
    return {r["prompt_id"]: bool(r["verified"]) for r in rows if r["model"] == model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny.yaml")
    ap.add_argument("--out", type=Path, required=True, help="holds samples/ and policy/, one runs_dir each")
    args, overrides = ap.parse_known_args()
    recipe = load_recipe(args.recipe, overrides)
    round1(args.recipe, args.out / "samples", overrides)
    teacher_run, policy_run = args.out / "samples" / recipe.name, args.out / "policy" / recipe.name
    if not policy_run.exists():
        shutil.copytree(teacher_run, policy_run, ignore=shutil.ignore_patterns(".lock"))
    round1(args.recipe, args.out / "policy", [*overrides, "dpo.pairs_from=policy"])

    metrics = {name: json.loads((run / "round-1/eval/metrics.json").read_text())
               for name, run in (("teacher's pairs", teacher_run), ("policy's pairs", policy_run))}
    pairs = {"teacher's pairs": json.loads((teacher_run / "round-1/select/manifest.json").read_text())["rows"]["pairs"],
             "policy's pairs": json.loads((policy_run / "round-1/policy_pairs/manifest.json").read_text()
                                          )["rows"]["pairs"]}
    a, b = verified(teacher_run, "dpo"), verified(policy_run, "dpo")
    better, worse = sum(b[p] and not a[p] for p in a), sum(a[p] and not b[p] for p in a)
    result = {
        "recipe": args.recipe, "seed": recipe.seed, "overrides": overrides, "pairs": pairs,
        "accuracy": {"sft": metrics["teacher's pairs"]["sft"]["accuracy"],
                     "sft_ci": metrics["teacher's pairs"]["sft"]["accuracy_ci"],
                     **{name: m["dpo"]["accuracy"] for name, m in metrics.items()},
                     **{f"{name}_ci": m["dpo"]["accuracy_ci"] for name, m in metrics.items()}},
        "policy_minus_teacher": {"prompts": len(a), "policy_only_right": better, "teacher_only_right": worse,
                                 "difference": (better - worse) / len(a),
                                 "ci": mcnemar_interval(better, worse, len(a)), "p_value": mcnemar_exact(better, worse)},
    }
    out = ROOT / "bench/results" / f"pairs-from-{recipe.name}-seed{recipe.seed}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    acc, d = result["accuracy"], result["policy_minus_teacher"]
    print(f"{args.recipe}, seed {recipe.seed}, round 1, held-out accuracy (greedy, {len(a)} prompts)\n")
    print("| model | pairs | accuracy [95%] |\n|---|---|---|")
    print(f"| SFT (shared) | - | {fmt_ci(acc['sft'], acc['sft_ci'])} |")
    for name in ("teacher's pairs", "policy's pairs"):
        print(f"| DPO on the {name} | {pairs[name]} | {fmt_ci(acc[name], acc[f'{name}_ci'])} |")
    print(f"\npolicy's minus teacher's: {d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], McNemar exact "
          f"p={d['p_value']:.2g} ({better} prompts only the policy's right, {worse} only the teacher's)\nwrote {out}")


if __name__ == "__main__":
    main()
