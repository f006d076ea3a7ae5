"""Promote: the gate that decides which of the round's checkpoints seeds the next round.

Each candidate is compared with the round's input model on the same prompts, joined by (model, prompt_id) in the
eval stage's `answers.jsonl`: McNemar's exact test on greedy correctness for accuracy, with the exact interval that
inverts it; a seeded paired bootstrap of per-prompt differences, with its percentile interval, for mean reward and
pass@k. A candidate is refused when it is significantly worse than the
input (two-sided p < `gate.alpha` with a negative difference) on the primary metric or a gated one, or when its
point estimate falls further below the input's than `gate.tolerances` allows. Of the others, the best on
`gate.primary_metric` is promoted; an earlier candidate in the recipe's order wins only when the best is within
noise of it (the same paired test), because a difference the evaluation cannot tell from noise is no reason to
overrule the order. If none passes, the input model itself is "promoted": the next round starts again from the
last model that earned it. `gate.force` promotes a named checkpoint regardless.

Two-sided tests, so that one p-value answers both "is it worse than the input?" and "are these two candidates
apart?". The interval recorded beside each p-value is at confidence 1 - `gate.alpha` and comes from the same test:
it excludes zero exactly when p < alpha, so a decision never reads "within noise" beside an interval clear of zero. Every comparison (difference, interval, p-value) and
the reasons in words go to `decision.json`; the next round reads the promoted model's path from this stage's
manifest. The best model so far by held-out accuracy (the evaluated fixed teacher or a promoted student) is carried
forward in `best.json`: it is what `teacher.source: best` samples from next round.

    align eval 1 --recipe recipes/tiny.yaml [--force dpo]        (make eval N=1 [FORCE=dpo])
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from alignment.config import GateConfig, InputError, is_paired
from alignment.manifest import write_json_atomic
from alignment.metrics import mcnemar_exact, mcnemar_interval, paired_bootstrap, pass_at_k
from alignment.prompts import read_jsonl
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult


def index(answers: list[dict]) -> dict[tuple[str, str], dict]:
    """The eval's greedy answers keyed by (model, prompt_id)."""
    rows = {(r["model"], r["prompt_id"]): r for r in answers}
    if len(rows) != len(answers):
        raise InputError("answers.jsonl holds two rows for the same model and prompt_id")
    return rows


def outcomes(rows: dict[tuple[str, str], dict], model: str, metric: str) -> dict[str, float]:
    """prompt_id -> the model's outcome on one prompt: 1/0 for accuracy (prompts no verifier applies to are left
    out; `accuracy/<capability>`: that capability's prompts only), the reward, or the prompt's unbiased pass@k from
    its sampled answers."""
    mine = [r for (m, _), r in rows.items() if m == model]
    if metric.startswith("accuracy/"):  # one capability's prompts of a mixed held-out set
        mine = [r for r in mine if r.get("capability") == metric.removeprefix("accuracy/")]
        metric = "accuracy"
    if metric == "accuracy":
        return {r["prompt_id"]: float(r["verified"]) for r in mine if r["verified"] is not None}
    if metric == "mean_reward":
        return {r["prompt_id"]: r["reward"] for r in mine}
    k = int(metric.removeprefix("pass@"))
    return {r["prompt_id"]: pass_at_k(r["num_samples"], r["num_correct"], k) for r in mine if "num_correct" in r}


def compare(ours: dict[str, float], theirs: dict[str, float], metric: str,
            names: tuple[str, str] = ("candidate", "baseline"), alpha: float = 0.05) -> dict:
    """The paired comparison of two models' per-prompt outcomes: mean difference, p-value, and the interval at
    confidence 1 - alpha of the same test (so it excludes zero exactly when p < alpha)."""
    if set(ours) != set(theirs) or not ours:
        raise InputError(f"gate: {metric} needs per-prompt outcomes of both models on the same prompts "
                         f"({len(ours)} and {len(theirs)} prompts, {len(set(ours) & set(theirs))} shared)")
    bad = [i for i in sorted(ours) if not (math.isfinite(ours[i]) and math.isfinite(theirs[i]))]
    if bad:  # a NaN difference makes every resample NaN, which the bootstrap would call p = 0
        raise InputError(f"gate: {metric} of prompt {bad[0]} is not a finite number ({names[0]} {ours[bad[0]]}, "
                         f"{names[1]} {theirs[bad[0]]}; {len(bad)} such prompts); see the eval's answers.jsonl")
    diffs = [ours[i] - theirs[i] for i in sorted(ours)]
    if metric.split("/")[0] == "accuracy":  # exact where an exact test exists, and the interval that inverts it
        better, worse = diffs.count(1.0), diffs.count(-1.0)
        ci, p = mcnemar_interval(better, worse, len(diffs), 1 - alpha), mcnemar_exact(better, worse)
        test, interval = "McNemar exact", "exact (Clopper-Pearson on the discordant prompts)"
    else:
        (ci, p), test, interval = paired_bootstrap(diffs, 1 - alpha), "paired bootstrap", "bootstrap percentile"
    return {"difference": sum(diffs) / len(diffs), "ci": ci, "confidence": 1 - alpha, "interval": interval,
            "p_value": p, "test": test, "prompts": len(diffs)}


def verdict(c: dict, alpha: float) -> str:
    if c["p_value"] >= alpha:
        return "within noise"
    return "significantly better" if c["difference"] > 0 else "significantly worse"


def in_words(c: dict, alpha: float) -> str:
    """One comparison in words: `dpo accuracy 0.4667 vs input 0.4333: +0.0333 [-0.0100, +0.0767], McNemar exact
    p=0.16, within noise; tolerance 0.0: pass`."""
    text = f"{c['model']} {c['metric']} {c['value']:.4f} vs {c['against']} {c['baseline']:.4f}: "
    if "p_value" in c:
        text += (f"{c['difference']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}], {c['test']} p={c['p_value']:.3g}, "
                 f"{verdict(c, alpha)}")
    else:
        text += f"{c['value'] - c['baseline']:+.4f} (no per-prompt outcomes: no test)"
    if "tolerance" in c:
        text += f"; tolerance {c['tolerance']}: {'pass' if c['within_tolerance'] else 'REGRESSION'}"
    return text


def decide(gate: GateConfig, metrics: dict, answers: list[dict]) -> dict:
    """The gate's decision from the eval's metrics and its per-prompt answers: {"promoted", "forced", "evidence"
    (the promoted model's comparison with the input on the primary metric), "comparisons", "reasons", ...}."""
    rows, primary = index(answers), gate.primary_metric
    checked = [primary] + sorted(set(gate.tolerances) - {primary})

    def comparison(model: str, against: str, metric: str) -> dict:
        value, base = metrics[model].get(metric), metrics[against].get(metric)
        if value is None or base is None:
            key = "primary_metric" if metric == primary else f"tolerances.{metric}"
            raise InputError(f"gate.{key}: the eval did not report {metric!r} "
                             f"(e.g. pass@k needs eval.num_samples, accuracy needs a verifier)")
        c = {"model": model, "against": against, "metric": metric, "value": value, "baseline": base}
        if is_paired(metric):
            c |= compare(outcomes(rows, model, metric), outcomes(rows, against, metric), metric, (model, against),
                         gate.alpha)
        return c

    comparisons, reasons, eligible = [], [], []
    for name in gate.candidates:
        refused = []
        for metric in checked:
            c = comparison(name, "input", metric)
            if "p_value" in c and verdict(c, gate.alpha) == "significantly worse":
                refused.append(f"{metric} significantly worse than the input model")
            if metric in gate.tolerances:
                c["tolerance"] = gate.tolerances[metric]
                c["within_tolerance"] = c["value"] >= c["baseline"] - c["tolerance"]
                if not c["within_tolerance"]:
                    refused.append(f"{metric} below the input model by more than its tolerance")
            comparisons.append(c)
            reasons.append(in_words(c, gate.alpha))
        if refused:
            reasons.append(f"{name} refused: {'; '.join(refused)}")
        else:
            eligible.append(name)

    promoted = "input"
    if eligible:
        promoted = best = max(eligible, key=lambda n: metrics[n][primary])  # the first in order on an exact tie
        for name in eligible[:eligible.index(best)]:  # earlier in the recipe's order than the best
            c = comparison(best, name, primary)
            comparisons.append(c)
            reasons.append(in_words(c, gate.alpha))
            if verdict(c, gate.alpha) == "within noise":
                promoted = name
                reasons.append(f"{best} is within noise of {name} on {primary}: the recipe's order prefers {name}")
                break
        if promoted == best:
            reasons.append(f"{best} promoted: the best {primary} of the candidates that passed "
                           f"({', '.join(eligible)})")
    else:
        reasons.append("no candidate passed; the next round starts from this round's input model")

    def evidence(model: str) -> dict | None:  # what the printout and report show beside the promoted model
        return next((c for c in comparisons if (c["model"], c["against"], c["metric"]) == (model, "input", primary)),
                    None)

    decision = {"promoted": promoted, "forced": False, "primary_metric": primary, "alpha": gate.alpha,
                "eligible": eligible, "evidence": evidence(promoted), "comparisons": comparisons, "reasons": reasons}
    if gate.force:
        if evidence(gate.force) is None:  # forced outside the candidates: the gate never compared it
            comparisons.append(comparison(gate.force, "input", primary))
        decision |= {"promoted": gate.force, "forced": True, "gate_would_promote": promoted,
                     "evidence": evidence(gate.force),
                     "reasons": reasons + [f"forced: {gate.force} promoted by gate.force"]}
    return decision


def best_so_far(gate: GateConfig, inputs: dict, metrics: dict, answers: list[dict], promoted: str,
                round_n: int) -> tuple[Path, dict]:
    """The best model up to this round by held-out accuracy, and its record (name, accuracy, per-prompt outcomes):
    the best before this round (the evaluated fixed teacher in round 1, else the round's input model), unless the
    model promoted now beats it, by `gate.best_so_far`'s rule."""
    rows = index(answers)  # accuracy outcomes: greedy correctness, 1/0, on the prompts a verifier applies to
    if "best_before" in inputs:
        before, record = Path(inputs["best_before"]), json.loads(Path(inputs["best_before_record"]).read_text())
    else:
        before, record = Path(inputs["input"]), {"name": "round 1 input", "accuracy": metrics["input"].get("accuracy"),
                                                 "outcomes": outcomes(rows, "input", "accuracy")}
    mine = {"name": f"round {round_n} {promoted}", "accuracy": metrics[promoted].get("accuracy"),
            "outcomes": outcomes(rows, promoted, "accuracy")}
    if mine["accuracy"] is None:
        return before, record
    better = record["accuracy"] is None or mine["accuracy"] > record["accuracy"]
    if not better and gate.best_so_far == "not_worse" and set(record.get("outcomes") or ()) == set(mine["outcomes"]):
        c = compare(mine["outcomes"], record["outcomes"], "accuracy", alpha=gate.alpha)
        better = c["p_value"] >= gate.alpha or c["difference"] >= 0  # within noise: the newer model
        mine["versus_" + record["name"].replace(" ", "_")] = {k: c[k] for k in ("difference", "ci", "p_value")}
    return (Path(inputs[promoted]), mine) if better else (before, record)


def recorded_path(model: Path, out_dir: Path) -> str:
    """A model path as the manifest records it: relative to this stage's folder when the model lives in the same
    run folder (a trained model of this or an earlier round), so a moved or copied run folder still resolves it;
    absolute otherwise (a pinned hub snapshot, a local teacher or student the recipe names), since a path relative
    to the stage folder would point at a different place as soon as the run folder moves."""
    run_folder = out_dir.resolve().parents[1]  # <runs_dir>/<recipe name>/round-<n>/promote -> <runs_dir>/<name>
    model = Path(model).resolve()
    return os.path.relpath(model, out_dir.resolve()) if model.is_relative_to(run_folder) else str(model)


def run(config: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    metrics, answers = json.loads(Path(inputs["metrics"]).read_text()), read_jsonl(Path(inputs["answers"]))
    decision = decide(config.gate, metrics, answers)
    model = inputs[decision["promoted"]]  # from the upstream manifests: right even if the run folder moved
    decision["model_path"] = str(model)
    write_json_atomic(out_dir / "decision.json", decision)
    best, record = best_so_far(config.gate, inputs, metrics, answers, decision["promoted"], round_n)
    write_json_atomic(out_dir / "best.json", record)
    return StageResult(outputs={"decision": "decision.json", "model": recorded_path(model, out_dir),
                                "best": recorded_path(best, out_dir), "best_record": "best.json"},
                       rows={"candidates": len(config.gate.candidates)},
                       stats={"promoted": decision["promoted"], "forced": decision["forced"],
                              "best_so_far": {k: v for k, v in record.items() if k != "outcomes"}})
