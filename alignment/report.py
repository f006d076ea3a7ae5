"""`make report`: every round's numbers in one Markdown file, with plots across rounds.

Reads only completed stages (those with a manifest) and writes `runs/<recipe>/report/`: `report.md` (each metric
with its 95% interval, each promotion with the gate's evidence) and PNGs of held-out accuracy, reward, win rate and
response length with 95% error bars, rejection-sampling acceptance and DPO reward margins over training steps.

    align report --recipe recipes/tiny.yaml
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from alignment.config import InputError, Recipe  # noqa: E402
from alignment.manifest import read_manifest  # noqa: E402
from alignment.metrics import fmt, fmt_evidence, metric_columns, metrics_table  # noqa: E402
from alignment.round import reference_metrics  # noqa: E402

MODELS = ("input", "sft", "dpo")
PLOTS = {  # file -> (metric in metrics.json, axis label)
    "accuracy.png": ("accuracy", "held-out accuracy (greedy)"),
    "reward.png": ("mean_reward", "mean reward"),
    "win_rate.png": ("win_rate_vs_input", "win rate vs the round's input model"),
    "length.png": ("mean_response_tokens", "mean response tokens"),
}


def collect(run_dir: Path) -> list[dict]:
    """One entry per round whose eval completed, in round order."""
    rounds = []
    for d in sorted(run_dir.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        if read_manifest(d / "eval") is None:
            continue
        entry = {"round": int(d.name.split("-")[1]), "metrics": json.loads((d / "eval/metrics.json").read_text())}
        if select := read_manifest(d / "select"):
            entry["acceptance"] = select["stats"]["acceptance_per_prompt"].get("mean")
            entry["sft_rows"], entry["pairs"] = select["rows"]["sft"], select["rows"]["pairs"]
        if read_manifest(d / "promote"):
            entry["promoted"] = json.loads((d / "promote/decision.json").read_text())
        history, dpo = d / "dpo" / "log_history.json", read_manifest(d / "dpo")
        if dpo and history.exists():
            entry["dpo_margins"] = [(h["step"], h["rewards/margins"]) for h in json.loads(history.read_text())
                                    if "rewards/margins" in h and "step" in h]
            entry["dpo_log_probs"] = dpo.get("stats", {}).get("log_probs", [])
        rounds.append(entry)
    return rounds


def plot_metric(rounds: list[dict], metric: str, label: str, path: Path, reference: dict) -> None:
    """Each model's metric over the rounds; the fixed teacher's (`reference`, when evaluated) as a flat line."""
    xs = [r["round"] for r in rounds]
    nan = float("nan")
    series, cis = {}, {}
    for i, name in enumerate(MODELS):
        ms = [r["metrics"][name] for r in rounds]
        if all(m.get(metric) is None for m in ms):
            continue
        # models side by side within a round, so that their error bars do not hide each other
        series[name] = ([x + 0.08 * (i - 1) for x in xs], [nan if m.get(metric) is None else m[metric] for m in ms])
        cis[name] = [m.get(f"{metric}_ci") or [nan, nan] for m in ms]
    if reference.get(metric) is not None:  # the fixed teacher, evaluated once: a flat line
        series["teacher"] = (xs, [reference[metric]] * len(xs))
        cis["teacher"] = [reference.get(f"{metric}_ci") or [nan, nan]] * len(xs)
    plot_series(series, "round", label, path, xticks=xs, cis=cis)


def plot_series(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, path: Path, kind="line",
                xticks=None, cis: dict[str, list] | None = None) -> None:
    """One line (or bars) per label; `cis` adds each point's 95% interval [lo, hi] as an error bar."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        if kind == "bar":
            ax.bar(xs, ys, label=label)
        elif cis and label in cis:
            below = [y - lo for y, (lo, _) in zip(ys, cis[label])]
            above = [hi - y for y, (_, hi) in zip(ys, cis[label])]
            ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o" if xticks else "." if len(xs) < 50 else None, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, **({"xticks": xticks} if xticks else {}))
    ax.grid(alpha=0.3)
    if kind != "bar":
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(recipe: Recipe) -> Path:
    run_dir = recipe.runs_dir / recipe.name
    rounds = collect(run_dir)
    if not rounds:
        raise InputError(f"no round of {run_dir} has a completed eval; run `make round N=1` first")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    reference = reference_metrics(recipe).get("teacher", {})
    for name, (metric, label) in PLOTS.items():
        plot_metric(rounds, metric, label, out / name, reference)
    plots = list(PLOTS)
    with_acceptance = [r for r in rounds if r.get("acceptance") is not None]
    if with_acceptance:
        plot_series({"acceptance": ([r["round"] for r in with_acceptance], [r["acceptance"] for r in with_acceptance])},
                    "round", "share of samples reaching sft_min_reward", out / "acceptance.png", kind="bar")
        plots.append("acceptance.png")
    margins = {f"round {r['round']}": tuple(zip(*r["dpo_margins"])) for r in rounds if r.get("dpo_margins")}
    if margins:
        plot_series(margins, "DPO step", "reward margin (chosen - rejected)", out / "dpo_margins.png")
        plots.append("dpo_margins.png")
    shifts = {f"round {r['round']} {side}": ([p["step"] for p in r["dpo_log_probs"]],
                                              [p[f"policy_{side}"] - p[f"ref_{side}"] for p in r["dpo_log_probs"]])
              for r in rounds if r.get("dpo_log_probs") for side in ("chosen", "rejected")}
    if shifts:  # chosen falling below 0 is DPO lowering the likelihood of the answers it prefers
        plot_series(shifts, "DPO step", "log p(policy) - log p(reference)", out / "dpo_log_probs.png")
        plots.append("dpo_log_probs.png")

    metric_cols = metric_columns([r["metrics"] for r in rounds])
    lines = [f"# Report: {recipe.name}", "", f"Rounds with a completed evaluation: {len(rounds)}.", ""] + metrics_table(
        [(f"{r['round']} | {name}", r["metrics"][name]) for r in rounds for name in MODELS], metric_cols, "round | model")
    lines += ["", "| round | SFT rows | DPO pairs | acceptance | promoted | reasons |", "|---|---|---|---|---|---|"]
    for r in rounds:
        p = r.get("promoted", {})
        promoted = p.get("promoted", "-") + (" (forced)" if p.get("forced") else "")
        evidence = fmt_evidence(p.get("evidence"))
        promoted += f": {evidence}" if evidence else ""
        lines.append(f"| {r['round']} | {fmt(r.get('sft_rows'))} | {fmt(r.get('pairs'))} | {fmt(r.get('acceptance'))} "
                     f"| {promoted} | {'; '.join(p.get('reasons', []))} |")
    lines += [""] + [f"![{p[:-4]}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
