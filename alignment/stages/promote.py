"""Promote: the gate that decides which of the round's checkpoints seeds the next round.

The first of `gate.candidates` whose every gated metric is no more than its tolerance below the round's input
model is promoted. If none passes, the input model itself is "promoted": the next round starts again from the
last model that earned it. `gate.force` promotes a named checkpoint regardless. The decision and every reason
go to `decision.json`; the next round reads the promoted model's path from this stage's manifest.

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


def run(recipe: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    metrics = json.loads(Path(inputs["metrics"]).read_text())
    decision = decide(recipe.gate, metrics)
    model = inputs[decision["promoted"]]  # from the upstream manifests: right even if the run folder moved
    decision["model_path"] = str(model)
    write_json_atomic(out_dir / "decision.json", decision)
    # A path relative to this folder, so that a moved run folder still resolves.
    return StageResult(outputs={"decision": "decision.json", "model": os.path.relpath(model, out_dir)},
                       rows={"candidates": len(recipe.gate.candidates)},
                       stats={"promoted": decision["promoted"], "forced": decision["forced"]})
