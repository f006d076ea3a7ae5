"""Figures people can trust: the recipe's rounds for several seeds, each in its own runs folder, summarised as one
table and one plot of the promoted model's held-out accuracy per round (mean and spread across seeds), with the
fixed teacher's accuracy as a line.

    make curve ROUNDS=6 SEEDS=3                      # recipes/tiny.yaml, seeds 0 1 2, about 40 minutes here
    .venv/bin/python bench/curve.py --rounds 6 --seeds 0 1 2 --out runs/curve [key.path=value ...]

Rounds already complete in a seed's folder are skipped (the rounds resume like any `make round`), so an
interrupted curve continues where it stopped. Writes <out>/curve.md, <out>/curve.png and <out>/curve.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment.config import load_recipe  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_seed(recipe: str, seed: int, rounds: int, out: Path, overrides: list[str]) -> dict:
    """Rounds 1..n for one seed; per round the promoted model's accuracy and interval, the teacher's, wall time."""
    runs = out / f"seed-{seed}"
    args = [f"seed={seed}", f"runs_dir={runs}", *overrides]
    result = {"seed": seed, "rounds": []}
    for n in range(1, rounds + 1):
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "alignment.cli", "round", str(n), "--recipe", recipe, *args],
                              cwd=ROOT, capture_output=True, text=True)
        (runs / f"round-{n}.log").parent.mkdir(parents=True, exist_ok=True)
        (runs / f"round-{n}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.exit(f"seed {seed} round {n} failed; see {runs / f'round-{n}.log'}\n{proc.stderr[-2000:]}")
        run_dir = runs / load_recipe(recipe, args).name
        metrics = json.loads((run_dir / f"round-{n}/eval/metrics.json").read_text())
        decision = json.loads((run_dir / f"round-{n}/promote/decision.json").read_text())
        best = json.loads((run_dir / f"round-{n}/promote/best.json").read_text())
        promoted = metrics[decision["promoted"]]
        result["rounds"].append({
            "round": n, "promoted": decision["promoted"], "accuracy": promoted["accuracy"],
            "accuracy_ci": promoted.get("accuracy_ci"), "input_accuracy": metrics["input"]["accuracy"],
            "sft": metrics["sft"]["accuracy"], "dpo": metrics["dpo"]["accuracy"], "best_so_far": best,
            "seconds": round(time.time() - start, 1)})
        teacher = run_dir / "teacher_eval" / "metrics.json"
        if teacher.exists():
            result["teacher"] = json.loads(teacher.read_text())["teacher"]["accuracy"]
        print(f"seed {seed} round {n}: promoted {decision['promoted']} {promoted['accuracy']:.3f} "
              f"({result['rounds'][-1]['seconds']:.0f}s)", flush=True)
    return result


def summarise(results: list[dict], rounds: int) -> list[dict]:
    rows = []
    for n in range(1, rounds + 1):
        accs = [r["rounds"][n - 1]["accuracy"] for r in results]
        halfwidths = [(ci[1] - ci[0]) / 2 for r in results if (ci := r["rounds"][n - 1]["accuracy_ci"])]
        rows.append({"round": n, "mean": statistics.mean(accs), "min": min(accs), "max": max(accs),
                     "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "per_seed": accs,
                     "mean_ci_halfwidth": statistics.mean(halfwidths) if halfwidths else None,
                     "promoted": [r["rounds"][n - 1]["promoted"] for r in results]})
    return rows


def table(results: list[dict], rows: list[dict], recipe: str, overrides: list[str]) -> str:
    teachers = [r["teacher"] for r in results if "teacher" in r]
    t = statistics.mean(teachers) if teachers else None
    lines = [f"Promoted model's held-out accuracy, {recipe} {' '.join(overrides)}, seeds "
             f"{[r['seed'] for r in results]}; CPU: {cpu_name()}.", "",
             "| round | mean | min - max | sd across seeds | mean 95% interval half-width (per seed) | per seed | "
             "promoted |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if r["mean_ci_halfwidth"] is None else f"±{r['mean_ci_halfwidth']:.3f}"
        lines.append(f"| {r['round']} | {r['mean']:.3f} | {r['min']:.3f} - {r['max']:.3f} | {r['sd']:.3f} | {ci} | "
                     f"{', '.join(f'{a:.3f}' for a in r['per_seed'])} | {', '.join(r['promoted'])} |")
    if t is not None:
        lines += ["", f"Fixed teacher (evaluated once per seed the same way): mean {t:.3f} "
                      f"({', '.join(f'{x:.3f}' for x in teachers)})."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [r["mean"] for r in rows], marker="o", label="promoted (mean over seeds)")
    ax.fill_between(xs, [r["min"] for r in rows], [r["max"] for r in rows], alpha=0.25, label="min - max")
    teachers = [r["teacher"] for r in results if "teacher" in r]
    if teachers:
        ax.axhline(statistics.mean(teachers), linestyle="--", color="gray", label="fixed teacher")
    ax.set(xlabel="round", ylabel="held-out accuracy", xticks=xs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny.yaml")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/curve"))
    args, overrides = ap.parse_known_args()
    args.out = args.out.resolve()
    results = [run_seed(args.recipe, s, args.rounds, args.out, overrides) for s in args.seeds]
    rows = summarise(results, args.rounds)
    (args.out / "curve.json").write_text(json.dumps({"results": results, "summary": rows, "cpu": cpu_name(),
                                                     "overrides": overrides}, indent=1))
    (args.out / "curve.md").write_text(table(results, rows, args.recipe, overrides))
    plot(results, rows, args.out / "curve.png")
    print((args.out / "curve.md").read_text())


if __name__ == "__main__":
    main()
