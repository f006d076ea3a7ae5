"""Where a round's stages write, and what identifies each stage input: an upstream output by its stage's
fingerprint, a prompt source by its bytes, a model folder by its content (alignment.seeding), a pinned Hub model by
its name and commit. The orchestrator compares fingerprints made of these; the pre-flight checks resolve models
through them."""

from __future__ import annotations

import os
from pathlib import Path

from alignment.config import InputError, Recipe
from alignment.manifest import hash_json, read_manifest
from alignment.prompts import source_identity
from alignment.seeding import model_identity
from alignment.stage_table import STAGES, File, Upstream, hashed_config


def round_dir(recipe: Recipe, round_n: int) -> Path:
    return recipe.runs_dir / recipe.name / f"round-{round_n}"


def stage_dir(recipe: Recipe, round_n: int, stage: str) -> Path:
    if STAGES[stage].once:  # built once per recipe, shared by every round
        return recipe.runs_dir / recipe.name / stage
    return round_dir(recipe, round_n) / stage


# --- input identities: {"path": ..., "hash": ...} ------------------------------------------------------------


def identity(recipe: Recipe, spec) -> dict:
    """Where an input is and what identifies it: an upstream output by its stage's fingerprint, a file by its
    content, a model folder by its files (a hub id by its name)."""
    if isinstance(spec, list):
        return [identity(recipe, s) for s in spec]
    if isinstance(spec, Upstream):
        folder = stage_dir(recipe, spec.round, spec.stage)
        if (m := read_manifest(folder)) is None:
            raise InputError(f"{spec.why}: {folder} has no manifest.json (that stage has not completed)")
        out = m["outputs"][spec.output]
        return {"path": os.path.normpath(folder / out), "hash": f"{m['fingerprint']}:{spec.output}"}
    if isinstance(spec, File):  # a prompt source (a file, a folder, a Hub dataset) or a preference file
        return source_identity(spec.path, spec.key)
    if spec.revision and not Path(spec.name).expanduser().is_dir():  # a pinned hub model: the stage loads that
        # commit's snapshot (runner.input_value); a local folder is what it is, whatever revision it names
        return {"path": spec.name, "revision": spec.revision, "hash": hash_json([spec.name, spec.revision])}
    return {"path": spec.name, "hash": model_identity(spec.name)}


def stage_inputs(recipe: Recipe, round_n: int, stage: str) -> dict:
    return {name: identity(recipe, spec) for name, spec in STAGES[stage].inputs(recipe, round_n).items()}


def fingerprint(stage: str, config: dict, inputs: dict) -> str:
    """What the stage's outputs are a function of: the recipe sections it reads (less transport settings) and
    its inputs' identities."""
    hashes = {k: [x["hash"] for x in v] if isinstance(v, list) else v["hash"] for k, v in inputs.items()}
    return hash_json({"stage": stage, "config": hashed_config(config), "inputs": hashes})
