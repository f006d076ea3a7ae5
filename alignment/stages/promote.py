"""Promote: the gate that decides which of the round's checkpoints seeds the next round.

The first of `gate.candidates` whose every gated metric is no more than its tolerance below the round's input
model is promoted. If none passes, the input model itself is "promoted": the next round starts again from the
last model that earned it. `gate.force` promotes a named checkpoint regardless. The decision and every reason
go to `decision.json`; the next round reads the promoted model's path from this stage's manifest. The best model
so far by held-out accuracy (the evaluated fixed teacher or a promoted student) is carried forward in `best.json`:
it is what `teacher.source: best` samples from next round.

    align eval 1 --recipe recipes/tiny.yaml [--force dpo]        (make eval N=1 [FORCE=dpo])
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignment.config import GateConfig, InputError
from alignment.manifest import write_json_atomic
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult


def decide(gate: GateConfig, metrics: dict) -> dict:
    """{"promoted": name, "forced": bool, "checks": [...], "reasons": [...]} from the eval metrics."""
    checks, passed = [], []
    for name in gate.candidates:
        ok = True
        for metric, tolerance in sorted(gate.tolerances.items()):
            value, base = metrics[name].get(metric), metrics["input"].get(metric)
            if value is None or base is None:
                raise InputError(f"gate.tolerances.{metric}: the eval did not report {metric!r} "
                                 f"(e.g. pass@k needs eval.num_samples, accuracy needs a verifier)")
            good = value >= base - tolerance
            ok &= good
            checks.append({"model": name, "metric": metric, "value": value, "input": base, "tolerance": tolerance,
                           "passed": good})
        if ok:
            passed.append(name)
    reasons = [f"{c['model']} {c['metric']} {c['value']:.4f} vs input {c['input']:.4f} (tolerance "
               f"{c['tolerance']}): {'pass' if c['passed'] else 'REGRESSION'}" for c in checks]
    if gate.force:
        return {"promoted": gate.force, "forced": True, "gate_would_promote": passed[0] if passed else "input",
                "checks": checks, "reasons": reasons + [f"forced: {gate.force} promoted by gate.force"]}
    promoted = passed[0] if passed else "input"
    if not passed:
        reasons.append("no candidate passed; the next round starts from this round's input model")
    return {"promoted": promoted, "forced": False, "checks": checks, "reasons": reasons}


def best_so_far(inputs: dict, metrics: dict, promoted: str, round_n: int) -> tuple[Path, dict]:
    """The best model up to this round by held-out accuracy, and its record: the best before this round (the
    evaluated fixed teacher in round 1, else the round's input model), unless the model promoted now beats it."""
    if "best_before" in inputs:
        before, record = Path(inputs["best_before"]), json.loads(Path(inputs["best_before_record"]).read_text())
    else:
        before, record = Path(inputs["input"]), {"name": "round 1 input", "accuracy": metrics["input"].get("accuracy")}
    accuracy = metrics[promoted].get("accuracy")
    if accuracy is not None and (record["accuracy"] is None or accuracy > record["accuracy"]):
        return Path(inputs[promoted]), {"name": f"round {round_n} {promoted}", "accuracy": accuracy}
    return before, record


def run(recipe: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    metrics = json.loads(Path(inputs["metrics"]).read_text())
    decision = decide(recipe.gate, metrics)
    model = inputs[decision["promoted"]]  # from the upstream manifests: right even if the run folder moved
    decision["model_path"] = str(model)
    write_json_atomic(out_dir / "decision.json", decision)
    best, record = best_so_far(inputs, metrics, decision["promoted"], round_n)
    write_json_atomic(out_dir / "best.json", record)
    # Paths relative to this folder, so that a moved run folder still resolves.
    return StageResult(outputs={"decision": "decision.json", "model": os.path.relpath(model, out_dir),
                                "best": os.path.relpath(best, out_dir), "best_record": "best.json"},
                       rows={"candidates": len(recipe.gate.candidates)},
                       stats={"promoted": decision["promoted"], "forced": decision["forced"], "best_so_far": record})
