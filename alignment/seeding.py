"""The one seeding rule for every sampler (generate, eval; transformers, vLLM or a server).

A request's seed is a hash of what it asks (its conversation, the sampling settings, the round's base seed) and of
the model's identity. Never of a batch, a shard, a position or a path: the same request gives the same samples
however requests are batched, sharded or resumed, and wherever the run folder lies.
"""

from __future__ import annotations

from pathlib import Path

from alignment.manifest import hash_json, hash_model_dir


def model_identity(name: str) -> str:
    """A model folder by the content of its weights, config and tokenizer files, wherever it lies and whatever
    trainer state or logs sit beside them (manifest.hash_model_dir); a hub id by its name."""
    return hash_model_dir(Path(name)) if Path(name).is_dir() else hash_json(name)


def request_seed(content: dict) -> int:
    return int(hash_json(content)[:8], 16)


def sample_seed(seed: int, k: int) -> int:
    """The seed of the k-th of a request's samples."""
    return int(hash_json([seed, k])[:15], 16)
