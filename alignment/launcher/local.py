"""A stage's process on this machine: its command line (`python -m alignment.runner`, or under `accelerate
launch` for a distributed trainer), its environment, and the prefork server that stages fork from."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alignment import prefork
from alignment.backends.vllm_server import free_port
from alignment.config import Recipe
from alignment.stage_table import asks_teacher, trainer_config


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def stage_command(recipe: Recipe, stage: str, job: Path, launch_args: list[str] = ()) -> list[str]:
    """`python -m alignment.runner job.json`, or the same under `accelerate launch` for a distributed trainer
    (`launch_args`: a SLURM job's processes, machines and rendezvous, in place of the recipe's process count)."""
    cfg = trainer_config(recipe, stage)
    if cfg is None or cfg.distributed is None:
        return [sys.executable, "-m", "alignment.runner", str(job)]
    # cpu_offload overrides the config file's offload settings (flags given on the command line win over it)
    offload = {"fsdp": ["--fsdp_offload_params", "true"], "zero3": ["--offload_param_device", "cpu",
               "--offload_optimizer_device", "cpu"]}.get(cfg.distributed, []) if cfg.cpu_offload else []
    # Under FSDP the recipe's gradient_checkpointing is FSDP's activation checkpointing (the config file leaves it
    # out, so this flag alone decides); training.trainer_fields turns the Trainer's own off, which transformers
    # requires.
    recompute = (["--fsdp_activation_checkpointing", str(cfg.gradient_checkpointing).lower()]
                 if cfg.distributed == "fsdp" else [])
    # here, a rendezvous port free now: torchrun's default (29500) is taken by any other distributed stage running
    # on this machine (another run, another user), whose store the second launch then fails to bind or joins
    local = ["--num_processes", str(cfg.num_processes), "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ACCELERATE_CONFIGS / f"{cfg.distributed}.yaml"), *(launch_args or local), *offload, *recompute,
            "-m", "alignment.runner", str(job)]


def stage_env(recipe: Recipe, stage: str) -> dict:
    """The stage's environment: the teacher's API key only where requests go to the teacher (generate, and score
    with a judge), so no other stage, nor the code it runs, can read it (from its own or its parent's /proc)."""
    env = dict(os.environ)
    if recipe.teacher.api_key_env and not asks_teacher(recipe, stage):
        env.pop(recipe.teacher.api_key_env, None)
    cfg = trainer_config(recipe, stage)
    if cfg is not None and cfg.distributed:
        import torch

        slurm = recipe.launcher.kind == "slurm"  # the job's GPUs are the recipe's, not this (login) machine's
        if not (recipe.launcher.train.gpus_per_node if slurm else torch.cuda.is_available()):
            env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo: accelerate's config alone would run one process
    return env


def stage_server(recipe: Recipe):
    """While inside, stages fork from one process that imported their libraries once (alignment/prefork.py). Its
    environment is that of every stage that does not ask the teacher: without the teacher's API key."""
    env = dict(os.environ)
    if recipe.teacher.api_key_env:
        env.pop(recipe.teacher.api_key_env, None)
    return prefork.serving(env, recipe.launcher.prefork)
