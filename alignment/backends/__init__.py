"""Generation backends of the generate stage: one interface, three engines.

A backend takes requests (a conversation, K, sampling settings, a seed) and yields `(index, Result)` pairs as
requests finish, in any order, so the stage can save each result the moment it exists. Which engine runs is the
recipe's `teacher.backend`: an enum, never a dotted name from YAML.
"""

from __future__ import annotations

import os
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

from alignment.config import Backend, TeacherConfig
from alignment.manifest import hash_json
from alignment.seeding import request_seed

if TYPE_CHECKING:  # the runner imports this module for its error type; torch loads only with a backend
    from alignment.generation import Completion


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    n: int  # K samples, asked for in one request so the engine shares the prompt's KV cache across them
    temperature: float
    top_p: float
    max_tokens: int
    seed: int  # per request, so a request's samples do not depend on what else was in flight with it


@dataclass
class Result:
    completions: list[Completion]
    prompt_tokens: int | None  # None when the engine did not say


class GenerationBackend(Protocol):
    """What the stages use of a backend."""

    retries: int  # requests sent again after a transient failure, for the stage's statistics

    def generate(self, requests: list[Request]) -> Iterator[tuple[int, Result]]:
        """`(index into requests, Result)` as each request finishes, in any order."""


class GenerationError(Exception):
    """Generation could not go on (an endpoint failed after its retries, a server never became healthy); the
    message names the endpoint. Results saved before it stay saved."""


def api_key(env: str | None) -> str | None:
    """The API key in the environment variable the recipe names (None when it names none); it must be set."""
    if env and not os.environ.get(env):
        raise GenerationError(f"teacher.api_key_env names {env}, which is not set")
    return os.environ[env] if env else None


def make_requests(conversations: list[list[dict]], model_id: str, sampling: dict, base_seed: int
                  ) -> tuple[list[str], dict[str, Request]]:
    """One request per distinct conversation, for every sampler (generate, eval, the judge): a request_id per
    conversation and {request_id: Request}. The id hashes the conversation, the model's identity
    (alignment.seeding), the sampling settings (num_samples, temperature, top_p, max_new_tokens) and the base seed;
    the request's seed is a hash of its id. So a request's samples never depend on its batch, shard or resume."""
    # "teacher": the key's name from when only generate sent requests; kept so saved shards still resume
    ids = [hash_json({"messages": m, "teacher": model_id, "sampling": sampling, "seed": base_seed})
           for m in conversations]
    return ids, {rid: Request(m, n=sampling["num_samples"], temperature=sampling["temperature"],
                              top_p=sampling["top_p"], max_tokens=sampling["max_new_tokens"],
                              seed=request_seed({"request_id": rid}))
                 for rid, m in zip(ids, conversations)}  # a repeated conversation: one request


def completion_record(c: Completion) -> list:
    """A completion as shards keep it: [text, tokens, finish_reason], and its stop_reason only where it has one
    (a tool-call step), so shards written before stop_reasons existed read the same."""
    return [c.text, c.num_tokens, c.finish_reason] + ([c.stop_reason] if c.stop_reason else [])


def send(backend: GenerationBackend, requests: dict[str, Request], done: dict[str, dict], shards: Path) -> None:
    """Send the requests not in `done` (records loaded by alignment.shards.load_shards), saving each record to
    the shards folder and into `done` as it finishes, so a killed or failed stage resumes from them."""
    from alignment.shards import ShardWriter

    todo = [rid for rid in requests if rid not in done]
    try:
        with ShardWriter(shards) as shard:
            for i, result in backend.generate([requests[rid] for rid in todo]):
                record = {"request_id": todo[i], "prompt_tokens": result.prompt_tokens,
                          "completions": [completion_record(c) for c in result.completions]}
                shard.write(record)
                done[todo[i]] = record
    except GenerationError as e:
        saved = sum(rid in done for rid in requests)
        raise GenerationError(f"{e}\n{saved} of {len(requests)} requests are saved in {shards}; running the stage "
                              "again resumes from them") from None


@contextmanager
def open_backend(cfg: TeacherConfig, model: str, log_dir: Path) -> Iterator[GenerationBackend]:
    """The recipe's backend, ready to `generate(requests)`; closed (and a started server stopped) on exit."""
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
