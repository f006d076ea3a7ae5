"""The in-process vLLM engine: each request asks for all K samples at once (`n=K`), so vLLM's PagedAttention
shares the prompt's KV-cache pages across them, as Llama 3 did for rejection sampling."""

from __future__ import annotations

from alignment.backends import Request, Result
from alignment.config import EngineConfig
from alignment.generation import Completion
from alignment.template import stop_token_ids


def engine_kwargs(cfg: EngineConfig) -> dict:
    """EngineConfig as vllm.LLM keyword arguments (the server takes the same, as command-line flags)."""
    kw = {"tensor_parallel_size": cfg.tensor_parallel_size, "dtype": cfg.dtype,
          "gpu_memory_utilization": cfg.gpu_memory_utilization, "enforce_eager": cfg.enforce_eager}
    if cfg.quantization:
        kw["quantization"] = cfg.quantization
    if cfg.enable_chunked_prefill is not None:
        kw["enable_chunked_prefill"] = cfg.enable_chunked_prefill
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    return kw


class VLLMBackend:
    retries = 0  # in-process: nothing to retry

    def __init__(self, model_path: str, cfg: EngineConfig, *, shard_size: int):
        from vllm import LLM  # imported here: machines without vLLM still run the other backends

        self.llm = LLM(model=model_path, **engine_kwargs(cfg))
        self.stop_ids = sorted(stop_token_ids(self.llm.get_tokenizer()))  # as every backend stops
        self.shard_size = shard_size

    def generate(self, requests: list[Request]):
        from vllm import SamplingParams

        for start in range(0, len(requests), self.shard_size):
            shard = requests[start:start + self.shard_size]
            params = [SamplingParams(n=q.n, temperature=q.temperature, top_p=q.top_p, max_tokens=q.max_tokens,
                                     seed=q.seed, stop_token_ids=self.stop_ids) for q in shard]
            outputs = self.llm.chat([q.messages for q in shard], params, use_tqdm=False)
            for i, out in enumerate(outputs):
                yield start + i, Result([completion(c.text, list(c.token_ids), c.finish_reason, self.stop_ids)
                                         for c in out.outputs], len(out.prompt_token_ids))

    def close(self) -> None:
        shutdown(self.llm)


def shutdown(llm) -> None:
    """Stop a vllm.LLM's engine-core and worker processes now rather than at interpreter exit, so the next model
    finds its memory free."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()


def completion(text: str, token_ids: list[int] | None, finish_reason: str | None, stop_ids) -> Completion:
    """A vLLM choice in our terms: the end-of-turn token is not counted, as in the transformers backend."""
    if token_ids is None:
        n = None
    else:
        n = len(token_ids) - (1 if token_ids and finish_reason == "stop" and token_ids[-1] in stop_ids else 0)
    return Completion(text, n, "length" if finish_reason == "length" else "stop")
