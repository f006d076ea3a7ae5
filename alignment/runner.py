"""Runs one stage in its own process and writes its manifest last.

The orchestrator starts `python -m alignment.runner <stage folder>/job.json`; when the process ends, whatever
memory the stage held (models, trainers, engines) is released. The manifest goes in only after the stage's
outputs are all on disk, so a stage killed half-way leaves a folder without a manifest: not done. A model the
stage writes must also load (config, whole weights, tokenizer: alignment/model_folder.py) before it counts as done.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from alignment.backends import GenerationError
from alignment.config import InputError, PromptSource
from alignment.hub import pinned_snapshot
from alignment.manifest import MANIFEST, git_commit, hash_json, library_versions, write_json_atomic
from alignment.model_folder import IncompleteModel, check_model_folder
from alignment.stage_table import STAGES, StageConfig


def input_value(x: dict) -> Path | PromptSource:
    """An input as the stage receives it: a path; the prompt source section the recipe gave; or, for a pinned hub
    model, its commit's snapshot (fetched once into the hub cache, only the files transformers loads), so every
    `from_pretrained` in the stage loads exactly that revision."""
    if "source" in x:
        return PromptSource.model_validate(x["source"])
    if "revision" in x:
        return pinned_snapshot(x["path"], x["revision"])
    return Path(x["path"])


def run_job(job_path: Path) -> dict:
    job = json.loads(job_path.read_text())
    if job["stage"] not in STAGES:
        raise InputError(f"{job_path}: unknown stage {job['stage']!r}; expected one of {list(STAGES)}")
    stage = importlib.import_module(f"alignment.stages.{job['stage']}")  # a fixed name from the table, never YAML
    cfg = StageConfig(job["stage"], job["config"])  # the declared sections only
    out_dir = job_path.parent
    inputs = {name: [input_value(x) for x in v] if isinstance(v, list) else input_value(v)
              for name, v in job["inputs"].items()}
    start = time.time()
    result = stage.run(cfg, inputs, out_dir, job["round"])
    wall = time.time() - start
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # under `accelerate launch`, the main process alone writes the manifest
    declared = STAGES[job["stage"]].outputs
    if set(result.outputs) != set(declared):
        raise RuntimeError(f"stage {job['stage']} returned outputs {sorted(result.outputs)}; the stage table "
                           f"declares {sorted(declared)}")
    if missing := [p for p in result.outputs.values() if not (out_dir / p).exists()]:
        raise RuntimeError(f"stage {job['stage']} did not write its outputs {missing}")
    for name in STAGES[job["stage"]].models:  # a folder of files is not yet a model the next stage can load
        check_model_folder(out_dir / result.outputs[name], f"stage {job['stage']}'s output {name!r}")
    manifest = {
        "stage": job["stage"], "round": job["round"], "recipe": job["recipe_name"], "recipe_file": job["recipe_file"],
        "overrides": job["overrides"], "config": job["config"], "config_hash": hash_json(job["config"]),
        "inputs": job["inputs"], "fingerprint": job["fingerprint"], "outputs": result.outputs, "rows": result.rows,
        "stats": result.stats, "wall_time_s": round(wall, 2), "versions": library_versions(),
        "git_commit": git_commit(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m alignment.runner <stage folder>/job.json")
    try:
        run_job(Path(sys.argv[1]))
    except (InputError, GenerationError, IncompleteModel) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
