"""The Hugging Face Hub: whether it can be reached, and a pinned commit's snapshot fetched into its cache."""

from __future__ import annotations

import os
import socket
import tempfile
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlparse


def hub_offline() -> str | None:
    """Why the Hub cannot be used (HF_HUB_OFFLINE, or no connection), or None: one quick connection instead of
    a minute of retries inside transformers or datasets later."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError as e:
        return f"{endpoint.hostname} cannot be reached: {e}"
    return None


# What transformers reads of a Hub model: config and generation config, the tokenizer's files (tokenizer.json and
# its config, a sentencepiece tokenizer.model, BPE vocab and merges, a chat_template.jinja), the safetensors and
# their index. Meta's repos also hold `original/`, the consolidated checkpoint for Meta's own code (the 405B's is as
# large as the model), which nothing here reads.
CONFIG_FILES = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
WEIGHT_FILES = ["*.safetensors"]
NEVER_LOADED = ["original/*"]


def is_hub_id(name: str) -> bool:
    """`org/name` and not a path on this machine: what from_pretrained would look up on the Hub."""
    return (not Path(name).expanduser().exists() and not name.startswith(("/", ".", "~")) and name.count("/") == 1
            and all(name.split("/")))


def main_commit(name: str, repo_type: str = "model") -> str:
    """The commit `main` points at: asked of the Hub, or, offline, read from the local cache's refs (a cache filled
    by `huggingface-cli download` on a machine with a network)."""
    from huggingface_hub import CacheNotFound, HfApi, constants, scan_cache_dir

    if (why := hub_offline()) is None:
        return HfApi().repo_info(name, repo_type=repo_type).sha
    try:
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos  # (named: its default is bound when it first loads)
    except CacheNotFound:
        repos = []
    for repo in (r for r in repos if r.repo_id == name and r.repo_type == repo_type):
        for revision in repo.revisions:
            if "main" in revision.refs:
                return revision.commit_hash
    raise RuntimeError(f"the Hub cannot be asked ({why}) and the local cache holds no `main` of the {repo_type} "
                       f"{name!r}")


def pinned_snapshot(name: str, revision: str, weights: bool = True, repo_type: str = "model") -> Path:
    """The commit's snapshot folder in the Hub cache, holding what transformers loads (`weights` False: config and
    tokenizer only, what the pre-round checks read; a dataset: every file), fetched if missing. Under `accelerate
    launch` every rank asks for it: a file lock in the cache lets one fetch while the others wait, and then find
    every file cached."""
    from filelock import FileLock
    from huggingface_hub import constants, snapshot_download

    locks = Path(constants.HF_HUB_CACHE) / ".locks"
    with suppress(OSError):
        locks.mkdir(parents=True, exist_ok=True)
    if not os.access(locks, os.W_OK):  # a read-only shared cache: the ranks of this machine still take turns
        locks = Path(tempfile.gettempdir())
    patterns = None if repo_type == "dataset" else CONFIG_FILES + (WEIGHT_FILES if weights else [])
    with FileLock(str(locks / f"alignment--{name.replace('/', '--')}--{revision}.lock")):
        return Path(snapshot_download(name, revision=revision, repo_type=repo_type, ignore_patterns=NEVER_LOADED,
                                      allow_patterns=patterns))
