"""The Hub commit of every model and dataset a recipe names without one, fixed for the whole run.

A recipe may leave a Hub id's `revision` null, as `from_pretrained` and `load_dataset` let their users do. Then the
first command that starts work (`align round`, `eval`, `stage`) resolves the repo's `main` to its commit, prints a
notice, and records it in `<runs_dir>/<name>/pins.json`; every later stage and round of the run reads that commit,
and every manifest records it (a stage's config and inputs carry it). So a run never mixes two versions of a repo
that moved while it ran, and the pins file says exactly what a run read. A revision the recipe gives always wins;
a pin only fills a blank. To share a run, copy the pins into the recipe.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from alignment.config import InputError, Recipe
from alignment.hub import is_hub_id, main_commit
from alignment.manifest import write_json_atomic

PINS = "pins.json"


def references(d: dict) -> list[tuple[list, str, str, str]]:
    """(where in the recipe's dump, revision key, repo type, repo id) of each Hub id the recipe names without a
    revision."""
    out = []

    def model(path: list, section: dict | None, name_key: str, rev_key: str) -> None:
        name = section.get(name_key) if section else None
        if isinstance(name, str) and is_hub_id(name) and not section.get(rev_key):
            out.append((path, rev_key, "model", name))

    if d["student"].get("source") == "path":
        model(["student"], d["student"], "model_name_or_path", "revision")
    if d["teacher"].get("source") == "path" and not d["teacher"].get("endpoints"):  # (endpoints: its servers decide)
        model(["teacher"], d["teacher"], "model_name_or_path", "revision")
    model(["reward", "reward_model"], d["reward"].get("reward_model"), "model_name_or_path", "revision")
    model(["dpo"], d["dpo"], "ref_model_name_or_path", "ref_model_revision")
    p = d["prompts"]
    sources = [(["prompts", "train_path"], p.get("train_path"))]
    sources += [(["prompts", "sources", i, "source"], s["source"]) for i, s in enumerate(p.get("sources") or [])]
    held_out = p["eval_path"]
    sources += ([(["prompts", "eval_path", i], s) for i, s in enumerate(held_out)] if isinstance(held_out, list)
                else [(["prompts", "eval_path"], held_out)])
    out += [(path, "revision", "dataset", s["dataset"]) for path, s in sources
            if isinstance(s, dict) and s.get("dataset") and not s.get("revision")]
    return out


def pins_file(recipe: Recipe) -> Path:
    return Path(recipe.runs_dir) / recipe.name / PINS


def pins_file_of(stage_folder: Path) -> Path:
    """The run's pins file, seen from a stage's folder: runs/<name>/round-<n>/<stage>, or runs/<name>/<stage> for
    the stages built once per run (alignment.inputs.stage_dir)."""
    run = stage_folder.parent
    return (run.parent if re.fullmatch(r"round-\d+", run.name) else run) / PINS


def read_pins(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the run's pinned Hub commits: {e}; remove it to resolve them again"
                         ) from None


def record(path: Path, pins: dict, repo_type: str, name: str) -> str:
    """`main`'s commit of the repo, now, added to the run's pins (in `pins` and on disk)."""
    commit = main_commit(name, repo_type)
    pins.setdefault(repo_type, {})[name] = {"commit": commit,
                                            "resolved": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, pins)
    return commit


def commit_of(path: Path, repo_type: str, name: str) -> str:
    """The run's commit of a repo that the recipe cannot name (an lm-eval task's dataset): the pinned one, else
    `main`'s now, pinned from here on."""
    pins = read_pins(path)
    pinned = pins.get(repo_type, {}).get(name)
    return pinned["commit"] if pinned else record(path, pins, repo_type, name)


def pin(recipe: Recipe, resolve: bool) -> tuple[Recipe, list[str]]:
    """The recipe with the run's pinned commit in each blank revision, and what to tell the user. `resolve`: ask
    the Hub (or the local cache, offline) for the commits not yet pinned, and record them; otherwise a blank
    without a pin stays blank and is only named."""
    d = recipe.model_dump()
    refs = references(d)
    if not refs:
        return recipe, []
    path = pins_file(recipe)
    pins = read_pins(path)
    notes = []
    for where, rev_key, repo_type, name in refs:
        key = ".".join(map(str, where + [rev_key]))
        pinned = pins.get(repo_type, {}).get(name)
        if pinned is None and resolve:
            try:
                commit = record(path, pins, repo_type, name)
            except Exception as e:  # (the Hub's own errors: no such repo, gated, no network)
                raise InputError(f"{key}: {name!r} has no pinned revision, and its `main` cannot be resolved: "
                                 f"{str(e).splitlines()[0]}") from None
            pinned = pins[repo_type][name]
            notes.append(f"notice: {key}: {name} ({repo_type}) has no revision in the recipe; this run reads `main` "
                         f"as of now, commit {commit}, recorded in {path}: every later stage and round of the run "
                         "reads that commit. Set the revision in the recipe to pin it yourself.")
        if pinned is None:
            notes.append(f"note: {key}: {name} ({repo_type}) has no revision; the first `align round` resolves "
                         f"`main` to its commit and records it in {path}")
            continue
        node = d
        for k in where:
            node = node[k]
        node[rev_key] = pinned["commit"]
    return Recipe.model_validate(d), notes
