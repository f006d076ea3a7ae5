"""Generation backends of the generate stage: one interface, three engines.

A backend takes requests (a conversation, K, sampling settings, a seed) and yields `(index, Result)` pairs as
requests finish, in any order, so the stage can save each result the moment it exists. Which engine runs is the
recipe's `teacher.backend`: an enum, never a dotted name from YAML.
"""

from __future__ import annotations

from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from alignment.backends.base import (Completion, GenerationBackend, GenerationError, Request, Result, Serving, api_key,
                                     completion_record, make_requests, send)
from alignment.config import Backend, TeacherConfig

__all__ = ["Completion", "GenerationBackend", "GenerationError", "Request", "Result", "Serving", "api_key",
           "completion_record", "make_requests", "open_backend", "send"]


@contextmanager
def open_backend(cfg: Serving | TeacherConfig, model: str, log_dir: Path) -> Iterator[GenerationBackend]:
    """The model served as `cfg` says (a teacher section: as the teacher is served), ready to `generate(requests)`;
    closed (and a started server stopped) on exit."""
    cfg = cfg if isinstance(cfg, Serving) else Serving.of(cfg)
    if cfg.backend == Backend.transformers:
        from alignment.backends.hf import TransformersBackend

        yield TransformersBackend(model, batch_size=cfg.batch_size, shard_size=cfg.shard_size)
    elif cfg.backend == Backend.vllm:
        from alignment.backends.vllm_engine import VLLMBackend

        with closing(VLLMBackend(model, cfg.engine, shard_size=cfg.shard_size)) as backend:
            yield backend
    elif cfg.serve:
        from alignment.backends.openai_client import OpenAIBackend
        from alignment.backends.vllm_server import VLLMServer
        from alignment.template import load_tokenizer, stop_token_ids

        # where the other backends stop: a model's generation_config may list only its end of turn as EOS
        tokenizer = load_tokenizer(model)  # the model is a local folder here
        with VLLMServer(model, cfg.engine, port=cfg.server_port, api_key_env=cfg.api_key_env,
                        startup_timeout_s=cfg.server_startup_timeout_s, log_path=log_dir / "server.log") as server:
            yield OpenAIBackend([server.base_url], model, cfg, stop_token_ids=sorted(stop_token_ids(tokenizer)),
                                tokenizer=tokenizer)
    else:
        from alignment.backends.openai_client import OpenAIBackend
        from alignment.template import load_tokenizer

        # existing endpoints: decode their token ids with the model's tokenizer where the model is a local folder
        # (elsewhere, their text is taken as it comes, and no tool-call ending can be told from an end of turn)
        tokenizer = load_tokenizer(model) if Path(model, "tokenizer_config.json").is_file() else None
        yield OpenAIBackend(cfg.endpoints, model, cfg, tokenizer=tokenizer)
