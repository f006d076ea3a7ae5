"""Artifacts: a stage folder is complete exactly when its manifest.json exists, and the manifest is written last.

The manifest records what went in (config and input hashes), what came out, and how it went (rows, statistics,
versions, wall time). A stage's `fingerprint` hashes its config section with the identities of its inputs; an
upstream identity is the upstream fingerprint, so a change anywhere invalidates exactly what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

from alignment.config import InputError

MANIFEST = "manifest.json"
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "pydantic", "vllm")


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_model_dir(path: Path) -> str:
    """Identity of a model folder we did not produce: file names and sizes, plus the small config files' bytes.

    Hashing every weight byte of a 70B checkpoint would take minutes each round; sizes plus configs catch a
    swapped checkpoint in practice."""
    entries = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            small = p.suffix in (".json", ".jinja", ".txt") and p.stat().st_size < 1 << 20
            entries.append([str(p.relative_to(path)), p.stat().st_size, hash_file(p) if small else None])
    return hash_json(entries)


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary file in the same folder, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, or None when the stage has not completed."""
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (ValueError, RecursionError) as e:  # written atomically, so only a hand edit or a failing disk does this
        raise InputError(f"{p}: not a readable manifest ({e}); delete it to run that stage again") from None


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None
