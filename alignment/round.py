"""The orchestrator: decides which stages of a round are due, in what order, and runs each in its own process.

Which stages exist, what each reads and where its inputs come from is `alignment/stage_table.py`; this module
only walks it. A stage is due when its folder has no manifest, or the manifest's fingerprint differs from the one
computed now from the recipe sections it declares and its inputs' identities. Inputs are exactly the paths named
in upstream manifests (or in the recipe), never "the latest folder".

    align round 1 --recipe recipes/tiny.yaml [key.path=value ...]
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from alignment.config import InputError, Recipe
from alignment.launcher import cancel_recorded, launch, stage_server
from alignment.preflight import check_round_models
from alignment.inputs import fingerprint, identity, round_dir, stage_dir, stage_inputs
from alignment.manifest import TORN, read_manifest
from alignment.metrics import fmt, fmt_ci, fmt_evidence, metric_columns, metrics_table
from alignment.stage_table import EVAL_STAGES, MODEL_MAKERS, STAGES, round_stages, stage_config, student, upstreams


class StageFailed(Exception):
    pass


@contextmanager
def run_lock(recipe: Recipe):
    """One writer per recipe run folder. A second `align round`, `eval` or `stage` on it fails at once, naming the
    holder; read-only commands (status, stats, report) take no lock. flock, so the kernel releases it when the
    holder exits, even by kill -9."""
    folder = recipe.runs_dir / recipe.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(f"{folder} is in use by another run ({f.read().strip() or 'starting'}); wait for it to "
                             "finish, or stop it") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}")
        f.flush()
        yield


# --- running -------------------------------------------------------------------------------------------------


def run_stage(recipe: Recipe, round_n: int, stage: str, *, recipe_file: str, overrides: list[str],
              force: bool = False) -> bool:
    """Run the stage in a fresh process unless its manifest is current; True when it ran."""
    folder = stage_dir(recipe, round_n, stage)
    config = stage_config(recipe, stage)
    inputs = stage_inputs(recipe, round_n, stage)
    fp = fingerprint(stage, config, inputs)
    old = read_manifest(folder)
    if old is not None and old["fingerprint"] == fp and not force:
        print(f"[round {round_n}] {stage}: up to date ({old['wall_time_s']:.0f}s when it ran), skipped", flush=True)
        return False
    # A run that died with this very fingerprint left work that is still valid (generation shards, trainer
    # checkpoints): keep its folder and resume. Anything else starts from an empty folder, so stale outputs of an
    # earlier run never mix with this one's.
    resume = False
    with suppress(OSError, ValueError, KeyError):  # no job.json, or not one that a run of ours wrote
        resume = old is None and json.loads((folder / "job.json").read_text())["fingerprint"] == fp
    why = ("forced" if force and old else "recipe or inputs changed" if old
           else "resuming an interrupted run" if resume else "not done yet")
    print(f"[round {round_n}] {stage}: running ({why})", flush=True)
    cancel_recorded(folder)  # SLURM jobs of an earlier run that outlived it must not write into this one
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    elif resume:  # a job of an earlier run that finished while being cancelled: this run's manifest is the one
        (folder / "manifest.json").unlink(missing_ok=True)
        for torn in folder.rglob(TORN):  # a write the kill cut short: never renamed into place, never to be read
            torn.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    job = {"stage": stage, "round": round_n, "recipe_name": recipe.name, "recipe_file": recipe_file,
           "overrides": overrides, "config": config, "inputs": inputs, "fingerprint": fp}
    start = time.time()
    code = launch(recipe, round_n, stage, folder, job)
    if code != 0:
        raise StageFailed(f"stage {stage} of round {round_n} failed (exit code {code}); {folder} has "
                          "no manifest, so the next run of this round starts that stage again")
    print(f"[round {round_n}] {stage}: done in {time.time() - start:.0f}s", flush=True)
    return True


def run_round(recipe: Recipe, round_n: int, *, recipe_file: str, overrides: list[str], eval_only: bool = False
              ) -> dict:
    """Run whichever stages of round n are due (from eval on, with `eval_only`), then print its evaluation and
    promotion."""
    if round_n < 1:
        raise InputError(f"round must be 1 or more, got {round_n}")
    if recipe.rounds is not None and round_n > recipe.rounds:
        raise InputError(f"round {round_n}: the recipe plans {recipe.rounds} rounds (key `rounds`); raise it to go on")
    if eval_only and not round_dir(recipe, round_n).exists():
        raise InputError(f"round {round_n} does not exist: no folder {round_dir(recipe, round_n)}; "
                         f"run `make round N={round_n}` first")
    if round_n > 1:
        identity(recipe, student(recipe, round_n))  # fail now, before any work, if round n-1 is missing
    checked = False
    with run_lock(recipe), stage_server(recipe):
        for stage in round_stages(recipe, round_n, EVAL_STAGES if eval_only else tuple(STAGES)):
            if stage.name not in MODEL_MAKERS and not eval_only and not checked:  # models exist now: check them
                check_round_models(recipe, round_n)  # (preflight) before any stage spends time on them
                checked = True
            run_stage(recipe, round_n, stage.name, recipe_file=recipe_file, overrides=overrides)
    metrics, decision, best = (json.loads((stage_dir(recipe, round_n, s) / f"{f}.json").read_text())
                               for s, f in (("eval", "metrics"), ("promote", "decision"), ("promote", "best")))
    print(format_metrics(round_n, {**metrics, **reference_metrics(recipe)}))
    print(promotion(decision, metrics), *(f"  {reason}" for reason in decision["reasons"]), sep="\n")
    print(f"best so far: {best['name']} (held-out accuracy {fmt(best['accuracy'])})")
    return metrics


def reference_metrics(recipe: Recipe) -> dict:
    """{"teacher": metrics} of the fixed teacher, when the recipe evaluated it; else {}."""
    folder = stage_dir(recipe, 0, "teacher_eval")
    return json.loads((folder / "metrics.json").read_text()) if read_manifest(folder) else {}


def status(recipe: Recipe, round_n: int, stage: str) -> str:
    """'done' (manifest matches the recipe and inputs now), 'stale' (it does not), or 'missing'."""
    if (m := read_manifest(stage_dir(recipe, round_n, stage))) is None:
        return "missing"
    try:
        fp = fingerprint(stage, stage_config(recipe, stage), stage_inputs(recipe, round_n, stage))
    except InputError:
        return "stale"  # an input it was built from is gone
    return "done" if m["fingerprint"] == fp else "stale"


def round_status(recipe: Recipe, rounds: list[int]) -> dict[tuple[int, str], str]:
    """{(round, stage): status} for the given rounds, where a done stage that builds on a stage that is not done
    (in its own round or an earlier one, as the table's inputs say) counts as stale: it will be run again."""
    memo: dict[tuple[int, str], str] = {}

    def st(n: int, name: str) -> str:
        key = (0 if STAGES[name].once else n, name)
        if key not in memo:
            c = status(recipe, n, name)
            if c == "done" and any(st(u.round, u.stage) != "done" for u in upstreams(STAGES[name].inputs(recipe, n))):
                c = "stale"
            memo[key] = c
        return memo[key]

    return {(n, s.name): st(n, s.name) for n in rounds for s in round_stages(recipe, n)}


def status_table(recipe: Recipe) -> str:
    rounds = sorted(int(p.name.split("-")[1]) for p in (recipe.runs_dir / recipe.name).glob("round-*")
                    if p.name.split("-")[1].isdigit()) or [1]
    names = [s for s in STAGES if any(STAGES[s].when(recipe, n) for n in rounds)]
    table = round_status(recipe, rounds)
    lines = [f"{recipe.runs_dir / recipe.name}", "round  " + "".join(f"{s:>13}" for s in names) + "       disk"]
    for n in rounds:
        cells = [table.get((n, s), "-") for s in names]
        lines.append(f"{n:<7}" + "".join(f"{c:>13}" for c in cells) + f"{gib(round_dir(recipe, n)):>11}")
    once = [stage_dir(recipe, 0, s) for s in STAGES if STAGES[s].once]
    lines.append(f"once-per-recipe stages ({', '.join(p.name for p in once if p.exists()) or 'none yet'}): "
                 f"{gib(*once).strip()}")
    for n in rounds:  # what each finished round promoted, and on what evidence
        promote, evaluation = stage_dir(recipe, n, "promote"), stage_dir(recipe, n, "eval")
        if read_manifest(promote) and read_manifest(evaluation):
            lines.append(f"round {n} " + promotion(json.loads((promote / "decision.json").read_text()),
                                                   json.loads((evaluation / "metrics.json").read_text())))
    if teacher := reference_metrics(recipe).get("teacher"):
        lines.append(f"fixed teacher: accuracy {fmt_ci(teacher.get('accuracy'), teacher.get('accuracy_ci'))}")
    return "\n".join(lines)


def gib(*folders: Path) -> str:
    """Bytes on disk under the folders, in GiB: checkpoints are what fills a cluster's quota."""
    size = sum(f.stat().st_size for folder in folders if folder.exists() for f in folder.rglob("*") if f.is_file())
    return f"{size / 2**30:.2f} GiB"


def promotion(decision: dict, metrics: dict) -> str:
    """`promoted: sft, accuracy 0.467 [0.41, 0.52]; accuracy +0.033 [-0.010, +0.077] vs input, McNemar exact
    p=0.16`: the promoted model's primary metric with its interval, and the gate's evidence against the input."""
    name, metric = decision["promoted"], decision.get("primary_metric", "accuracy")  # older decisions lack it
    m = metrics[name]
    evidence = fmt_evidence(decision.get("evidence"))
    return (f"promoted: {name}{' (forced)' if decision['forced'] else ''}, {metric} "
            f"{fmt_ci(m.get(metric), m.get(f'{metric}_ci'))}" + (f"; {evidence}" if evidence else ""))


def format_metrics(round_n: int, metrics: dict) -> str:
    """The round's models, and the fixed teacher as a reference row when it was evaluated."""
    rows = [(name, metrics[name]) for name in ("input", "sft", "dpo", "teacher") if name in metrics]
    return "\n".join([f"round {round_n} held-out evaluation"] + metrics_table(rows, metric_columns([metrics])))
