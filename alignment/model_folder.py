"""Is a stage's model folder one that the next stage can load? Config, weights and tokenizer, each read by the
library that will read it, without loading a single weight (seconds at 70B: headers only).

A save can come out incomplete without raising: FSDP's sharded save writes no weights at all, a full disk or a kill
leaves a truncated safetensors file, a save that skipped the tokenizer leaves a folder that loads nowhere. The
runner writes no manifest over such a folder, and the training stages delete no checkpoint before it passes, so the
only copy of a run's weights is never thrown away for one that does not load.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


class IncompleteModel(Exception):
    """A model folder that does not load; the message names the folder and what is missing or unreadable."""


def check_model_folder(path: Path, what: str) -> int:
    """Raise IncompleteModel unless `path` holds a config transformers reads, safetensors weights whose every file
    is whole (its header parses and its tensors cover the file: a truncated file fails), and a tokenizer
    transformers loads. Returns the number of weight tensors."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoTokenizer

    where = f"{what} ({path})"
    if not path.is_dir():
        raise IncompleteModel(f"{where}: not a folder")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise IncompleteModel(f"{where}: no readable config.json: {e}") from None
    files, weight_map = weight_files(path, where)
    keys: dict[str, set] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:  # parses the header, checks the sizes against the file
                keys[f.name] = set(st.keys())
        except (SafetensorError, OSError) as e:
            raise IncompleteModel(f"{where}: {f.name} is not a whole safetensors file ({e}); the save was cut "
                                  "short or the disk filled") from None
    if not any(keys.values()):
        raise IncompleteModel(f"{where}: its safetensors files hold no tensors")
    if absent := [k for k, f in weight_map.items() if k not in keys[f]]:
        raise IncompleteModel(f"{where}: {INDEX} maps {len(absent)} tensors to files that lack them "
                              f"(first: {absent[0]} in {weight_map[absent[0]]})")
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise IncompleteModel(f"{where}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise IncompleteModel(f"{where}: no tokenizer loads from it: {e}") from None
    return sum(len(k) for k in keys.values())


def weight_files(path: Path, where: str) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files the folder's model loads from (model.safetensors, or every shard its index names) and
    the index's weight map ({} without an index)."""
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise IncompleteModel(f"{where}: {INDEX} has no readable weight_map ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        if missing := [s for s in shards if not (path / s).is_file()]:
            raise IncompleteModel(f"{where}: {INDEX} names {len(shards)} weight files and {missing} are missing")
        return [path / s for s in shards], weight_map
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS], {}
    present = sorted(p.name for p in path.iterdir())
    raise IncompleteModel(f"{where}: no weights ({WEIGHTS} or {INDEX}); the folder holds {present}. A sharded "
                          "(FSDP) save writes none: the final model must be gathered")
