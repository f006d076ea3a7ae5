"""What every engine shares: the request a sampler sends, the completions an engine returns, and the code that
makes requests (seeded by their content) and saves their results into shards as they finish. No engine library is
imported here: the OpenAI client, the judge and the runner use these types without loading torch or vLLM."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Protocol

from alignment.config import Backend, EngineConfig
from alignment.manifest import hash_json
from alignment.seeding import request_seed
from alignment.template import decode_response, stop_reason_of


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" or "length"
    stop_reason: str | None = None  # "end_of_message": it ended a tool-call step with <|eom_id|> (template.py)


@dataclass(frozen=True)
class Serving:
    """How a model is served, apart from which model it is: the engine and its settings, batch and shard sizes,
    and for the openai backend its transport (a server to start or endpoints to use, the key's variable,
    concurrency, timeouts, retries). The teacher's section gives one (`Serving.of(recipe.teacher)`); eval serves
    the round's checkpoints with its own (alignment.stages.eval.serving), whose engine also loads the vLLM reward
    model."""

    backend: Backend
    engine: EngineConfig
    batch_size: int
    shard_size: int
    serve: bool
    server_port: int
    server_startup_timeout_s: float
    endpoints: list[str]
    api_key_env: str | None
    max_concurrency: int
    request_timeout_s: float
    max_retries: int
    retry_backoff_s: float

    @classmethod
    def of(cls, section, **change) -> Serving:
        """A config section's serving fields (TeacherConfig has them all), with `change`s."""
        return cls(**{f.name: change[f.name] if f.name in change else getattr(section, f.name) for f in fields(cls)})

    def settings(self) -> dict:
        """The fields by name, as a config section's update."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


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

    def lm_eval_model(self, path: Path, batch_size: int, seed: int):
        """An lm-evaluation-harness model that generates on this engine (eval's `eval.lm_eval_tasks`)."""


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


def completion(text: str, token_ids: list[int] | None, finish_reason: str | None, stopped_on_token,
               tokenizer=None) -> Completion:
    """A vLLM choice in our terms: the stop token it ended on is not counted, as in the transformers backend;
    without token ids the count is unknown (None). With the model's tokenizer and the token ids, the text is
    decoded from the ids as the transformers backend decodes it (vLLM's own text drops <|python_tag|>), and an
    <|eom_id|> ending is recorded as the sample's stop_reason."""
    n = None if token_ids is None else len(token_ids) - (1 if stopped_on_token and token_ids else 0)
    stop_reason = None
    if tokenizer is not None and token_ids is not None:
        text = decode_response(tokenizer, token_ids[:n])
        stop_reason = stop_reason_of(tokenizer, token_ids[-1] if stopped_on_token and token_ids else None)
    return Completion(text, n, "length" if finish_reason == "length" else "stop", stop_reason)
