"""Where a stage's process runs: here (forked from the prefork server, or under `accelerate launch` for a
distributed trainer), or under `launcher.kind: slurm` as a SLURM job or job step (alignment/launcher/slurm.py).
The orchestrator (alignment/round.py) decides which stages are due; this package only starts them and returns
their exit codes. Nothing here imports the orchestrator.
"""

from __future__ import annotations

from pathlib import Path

from alignment import prefork
from alignment.config import Recipe
from alignment.launcher.local import stage_command, stage_env, stage_server
from alignment.launcher.slurm import cancel_recorded, run_stage_job
from alignment.manifest import write_json_atomic
from alignment.stage_table import job_kind

__all__ = ["cancel_recorded", "launch", "stage_command", "stage_env", "stage_server"]


def launch(recipe: Recipe, round_n: int, stage: str, folder: Path, job: dict) -> int:
    """Write the stage's job.json and run it where the recipe says; its exit code."""
    env = stage_env(recipe, stage)
    if recipe.launcher.kind == "slurm" and job_kind(recipe, stage):
        return run_stage_job(recipe, round_n, stage, folder, job, env)
    write_json_atomic(folder / "job.json", job)
    return prefork.run(stage_command(recipe, stage, folder / "job.json"), env)
