"""OpenAI-compatible endpoints (`vllm serve` on other nodes, or any compatible service) as a backend.

Requests are spread over the endpoints (each goes to the one with the fewest in flight, a retry to another),
at most `max_concurrency` at a time. Connection errors, timeouts, 429, 5xx and malformed or empty responses are
retried with exponential backoff (honouring Retry-After); other 4xx answers (a wrong model name, a bad request)
fail at once. A request that cannot be served raises GenerationError naming its endpoint; results that finished
before it have already been handed to the stage, which saved them. The API key is read from the environment
variable the recipe names and goes only into the Authorization header.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx

from alignment.backends.base import Completion, GenerationError, Request, Result, Serving, api_key, completion
from alignment.chat import token_ids
from alignment.template import holds_tool_call_step

RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class Retryable(Exception):
    pass


class OpenAIBackend:
    def __init__(self, endpoints: list[str], model: str, cfg: Serving, stop_token_ids: list[int] | None = None,
                 tokenizer=None):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.stop_token_ids = stop_token_ids  # a vLLM server the stage started: stop where the other backends do
        # the served model's tokenizer, where it is a local folder: answers with token ids are decoded from them as
        # the other backends decode (a server's text drops <|python_tag|>; its <|eom_id|> ending is an id)
        self.tokenizer = tokenizer
        self.model = model
        self.cfg = cfg
        self.key = api_key(cfg.api_key_env)
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self.client = httpx.Client(headers=headers, timeout=cfg.request_timeout_s, limits=limits)
        self.in_flight = {e: 0 for e in self.endpoints}
        self.lock = threading.Lock()
        self.retries = 0  # for the stage's statistics
        for endpoint in self.endpoints:
            self._check_model(endpoint)

    # --- one HTTP exchange, with retries ---------------------------------------------------------------------

    def _body(self, r) -> str:
        """The start of an error answer, with the API key cut out: a server may echo what it was sent."""
        text = r.text[:300]
        return text.replace(self.key, "<api key>") if self.key else text

    def _call(self, endpoint: str, method: str, path: str, body: dict | None = None) -> dict:
        """One attempt: the decoded JSON answer, Retryable, or GenerationError for answers not worth a retry."""
        try:
            r = self.client.request(method, endpoint + path, json=body)
        except httpx.TimeoutException:
            raise Retryable(f"no answer within teacher.request_timeout_s={self.cfg.request_timeout_s:g}s") from None
        except httpx.TransportError as e:
            raise Retryable(f"cannot connect ({type(e).__name__}: {e})") from None
        if r.status_code in RETRYABLE:
            err = Retryable(f"HTTP {r.status_code}: {self._body(r)[:200]}")
            err.retry_after = r.headers.get("retry-after")
            raise err
        if r.status_code >= 400:
            hint = " (check teacher.api_key_env)" if r.status_code in (401, 403) else ""
            raise GenerationError(f"{endpoint}{path}: HTTP {r.status_code}{hint}: {self._body(r)}")
        try:
            return r.json()
        except ValueError:
            raise Retryable(f"answer is not JSON: {self._body(r)[:200]!r}") from None

    def _with_retries(self, attempt_fn, what: str, first_endpoint: str):
        endpoint, errors = first_endpoint, []
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return attempt_fn(endpoint)
            except Retryable as e:
                errors.append(f"{endpoint}: {e}")
                if attempt == self.cfg.max_retries:
                    break
                with self.lock:
                    self.retries += 1
                delay = self.cfg.retry_backoff_s * 2 ** attempt
                after = getattr(e, "retry_after", None)
                if after and after.isdigit():
                    delay = max(delay, float(after))
                time.sleep(min(delay, 120.0))
                endpoint = self.endpoints[(self.endpoints.index(endpoint) + 1) % len(self.endpoints)]
        raise GenerationError(f"{what} failed after {self.cfg.max_retries} retries (teacher.max_retries); last "
                              f"error from {errors[-1]}")

    def lm_eval_model(self, path: Path, batch_size: int, seed: int):
        """lm-eval's `local-chat-completions` on the first endpoint, stopping where our answers stop."""
        from lm_eval.models.openai_completions import LocalChatCompletion

        stops = self.stop_token_ids or []

        class StopsAsEval(LocalChatCompletion):
            def _create_payload(self, *a, **kw):
                return {**super()._create_payload(*a, **kw), "stop_token_ids": stops}

        return StopsAsEval(model=str(path), base_url=self.endpoints[0] + "/chat/completions", tokenizer_backend=None,
                           tokenized_requests=False, num_concurrent=self.cfg.max_concurrency, seed=seed)

    def _check_model(self, endpoint: str) -> None:
        """Fail before any work when an endpoint is unreachable or does not serve the model asked for."""
        answer = self._with_retries(lambda e: self._call(e, "GET", "/models"), f"{endpoint}/models", endpoint)
        served = [m.get("id") for m in answer.get("data", []) if isinstance(m, dict)]
        if self.model not in served:
            raise GenerationError(f"{endpoint} serves {served}, not the teacher model {self.model!r} "
                                  "(teacher.model_name_or_path)")

    # --- generation ------------------------------------------------------------------------------------------

    def _complete(self, endpoint: str, q: Request) -> Result:
        body = {"model": self.model, "messages": q.messages, "n": q.n, "temperature": q.temperature,
                "top_p": q.top_p, "max_tokens": q.max_tokens, "seed": q.seed,
                "return_token_ids": True}  # vLLM: per-sample token counts (other servers ignore or omit it)
        if self.stop_token_ids:
            body["stop_token_ids"] = self.stop_token_ids
        # a tool-call step has no field in the chat API: the conversation goes as its template's token ids, to the
        # completions API (vLLM takes a prompt of token ids there)
        stepped = self.tokenizer is not None and holds_tool_call_step(q.messages)
        if stepped:
            body["prompt"] = token_ids(self.tokenizer, body.pop("messages"), add_generation_prompt=True)
        answer = self._call(endpoint, "POST", "/completions" if stepped else "/chat/completions", body)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != q.n:
            raise Retryable(f"malformed answer: expected {q.n} choices, got "
                            f"{len(choices) if isinstance(choices, list) else type(choices).__name__}")
        out = [None] * q.n
        for c in choices:
            text = (c.get("text") if stepped else (c.get("message") or {}).get("content")) if isinstance(c, dict) \
                else None
            i = c.get("index") if isinstance(c, dict) else None
            if not isinstance(text, str) or not isinstance(i, int) or not 0 <= i < q.n or out[i] is not None:
                raise Retryable(f"malformed choice: {str(c)[:200]}")
            out[i] = choice_completion(text, c, self.tokenizer)
        prompt_ids = answer.get("prompt_token_ids")
        usage = answer.get("usage") or {}
        return Result(out, len(prompt_ids) if isinstance(prompt_ids, list) else usage.get("prompt_tokens"))

    def _one(self, q: Request) -> Result:
        with self.lock:
            endpoint = min(self.endpoints, key=self.in_flight.get)
            self.in_flight[endpoint] += 1
        try:
            return self._with_retries(lambda e: self._complete(e, q), "a chat completion request", endpoint)
        finally:
            with self.lock:
                self.in_flight[endpoint] -= 1

    def generate(self, requests: list[Request]):
        """Yield (index, Result) as requests finish. On a failure, requests not yet sent are cancelled, those in
        flight are awaited and yielded if they succeed, then the first error is raised."""
        if self.tokenizer is None and (stepped := sum(holds_tool_call_step(q.messages) for q in requests)):
            raise GenerationError(f"{stepped} of {len(requests)} conversations hold a tool-call step (a message with "
                                  "stop_reason: end_of_message); OpenAI's chat API has no field for it, and the served "
                                  "model is not a local folder whose template could render it. Use teacher.backend "
                                  "transformers or vllm, or serve a local model folder")
        error = None
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            pending = {pool.submit(self._one, q): i for i, q in enumerate(requests)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    if fut.exception() is None:
                        yield i, fut.result()
                    elif error is None:
                        error = fut.exception()
                        for f in pending:
                            f.cancel()
        if error is not None:
            raise error


def choice_completion(text: str, choice: dict, tokenizer=None) -> Completion:
    """One choice as a Completion. vLLM's `token_ids` end with the stop token when the model stopped on one
    (stop_reason null: its end-of-sequence token; an integer: a stop token id); it is not counted, as in the
    other backends. Servers that return no token ids leave the count unknown (None)."""
    ids, finish, stop = choice.get("token_ids"), choice.get("finish_reason"), choice.get("stop_reason")
    return completion(text, ids if isinstance(ids, list) else None, finish,
                      finish != "length" and (stop is None or isinstance(stop, int)), tokenizer)
