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


def pinned_snapshot(name: str, revision: str, weights: bool = True) -> Path:
    """The commit's snapshot folder in the Hub cache, holding what transformers loads (`weights` False: config and
    tokenizer only, what the pre-round checks read), fetched if missing. Under `accelerate launch` every rank asks
    for it: a file lock in the cache lets one fetch while the others wait, and then find every file cached."""
    from filelock import FileLock
    from huggingface_hub import constants, snapshot_download

    locks = Path(constants.HF_HUB_CACHE) / ".locks"
    with suppress(OSError):
        locks.mkdir(parents=True, exist_ok=True)
    if not os.access(locks, os.W_OK):  # a read-only shared cache: the ranks of this machine still take turns
        locks = Path(tempfile.gettempdir())
    with FileLock(str(locks / f"alignment--{name.replace('/', '--')}--{revision}.lock")):
        return Path(snapshot_download(name, revision=revision, ignore_patterns=NEVER_LOADED,
                                      allow_patterns=CONFIG_FILES + (WEIGHT_FILES if weights else [])))
