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
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
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


# What defines a model, by file name: its weights, config and tokenizer. Never a trainer's state or logs
# (training_args.bin pickles the absolute output_dir), a README or a download cache: those say where and how a
# model was made, not what it computes. The top level (and the tokenizer's extra chat templates), as loaders read
# it: a hub repo's `original/` folder holds the same weights again in another format.
WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
BIN_WEIGHTS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")  # what loaders read where no safetensors are
DEFINING = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
            "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja")
# A digest is cached only for a file last written this long before it was read: a file rewritten with the same
# size within one tick of the filesystem's clock keeps its mtime, and must not be taken for the file hashed.
SETTLED_NS = 2_000_000_000


def model_files(path: Path) -> list[Path]:
    """The files that define the model in folder `path` (see WEIGHTS, DEFINING), sorted."""
    weights = [p for pattern in WEIGHTS for p in path.glob(pattern)]
    if not any(p.name.endswith(".safetensors") for p in weights):
        weights = [p for pattern in BIN_WEIGHTS for p in path.glob(pattern)]
    if not weights:
        raise InputError(f"{path}: a model folder without weights (expected *.safetensors or pytorch_model*.bin)")
    return sorted({p for p in weights + [p for pattern in DEFINING for p in path.glob(pattern)] if p.is_file()})


def digest_cache(folder: Path) -> Path:
    """Where the digests of a model folder's files are kept: under ~/.cache/alignment (XDG_CACHE_HOME), never in
    the folder itself, which may be read-only (a hub snapshot) or an artifact compared byte for byte. One small
    file per folder, named by its absolute path: a copied or moved folder has none yet, and is hashed again."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "alignment" / "digests" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"


def cached_digest(path: Path, cache: dict) -> tuple[str, dict | None]:
    """The file's sha256, from `cache` when the file is the one hashed (same real path, size, mtime, inode and
    device), and the entry to keep for it (None while the file is too fresh to trust its stat)."""
    st = path.stat()  # follows links: a hub snapshot's files link to its blobs
    key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    if (hit := cache.get(str(path))) and hit.get("stat") == key:
        return hit["sha256"], hit
    started = time.time_ns()
    digest = hash_file(path)
    after = path.stat()
    settled = [after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev] == key and \
        st.st_mtime_ns < started - SETTLED_NS
    return digest, {"stat": key, "sha256": digest} if settled else None


def hash_model_dir(path: Path) -> str:
    """Identity of a model folder by content: the sha256 of each file that defines the model (weights, config,
    tokenizer; see model_files) with its name, so the same model has the same identity wherever it lies.

    A 70B checkpoint is 140 GB, minutes to hash: digests are cached by file (real path, size, mtime_ns, inode), and
    the files are hashed in parallel (hashlib releases the GIL)."""
    files = model_files(path)
    store = digest_cache(path.resolve())
    try:
        cache = json.loads(store.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: it is only a cache
        cache = {}
    real = [p.resolve() for p in files]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda p: cached_digest(p, cache), real))
    kept = {str(p): entry for p, (_, entry) in zip(real, results) if entry is not None}
    if kept != cache:
        with suppress(OSError):  # a read-only home only costs the next call its hashing
            store.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(store, {"folder": str(path.resolve()), "files": kept})
    return hash_json([[p.relative_to(path).as_posix(), digest] for p, (digest, _) in zip(files, results)])


TORN = ".*.tmp-*"  # write_json_atomic's temporary files: one still there was cut short by a kill


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
    """The commit of the code that runs (this package's checkout), wherever the command runs from: a round run
    from another working directory records the same commit, not that folder's (or none)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=repo).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=repo).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None
