"""The transformers engine: batched `generate` in the stage's own process, for machines without vLLM.

Used by the generate stage (K samples per prompt), by evaluation (greedy) and by the tiny recipe's bootstrap. Each
sample reports how it ended: `stop` when the model wrote its end-of-turn token, `length` when it hit
max_new_tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LogitsProcessor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from alignment.backends.base import Completion, Request, Result
from alignment.chat import render, token_ids
from alignment.seeding import sample_seed
from alignment.template import decode_response, load_tokenizer, stop_reason_of, stop_token_ids


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(path: str):
    """A model for inference (from_pretrained leaves it in eval mode) and its tokenizer. On GPUs in bf16, spread by
    layers over every visible one (accelerate's device_map auto), so a model larger than one GPU loads, as the
    memory plan assumes; on CPU in fp32, since CPUs here compute bf16 slowly."""
    tokenizer = load_tokenizer(path)
    if torch.cuda.is_available():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto"), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


class SeededSampler(LogitsProcessor):
    """Draws each row's next token with that row's own generator, so a sample depends on its request's seed
    alone, never on what else shares its batch; `generate` then runs greedily over the one-hot scores returned."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds, self.generators = seeds, None
        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]

    def __call__(self, input_ids, scores):
        if self.generators is None:  # on the scores' device, made at the first step
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = scores.float().softmax(-1)
        picks = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks[:, None], 0.0)


@torch.inference_mode()
def sample(model, tokenizer, conversations: list[list[dict]], *, num_samples: int, temperature: float,
           top_p: float, max_new_tokens: int, batch_size: int, seeds: list[int] | None, desc: str
           ) -> list[list[Completion]]:
    """`num_samples` completions for each conversation, in input order; temperature 0 is greedy. With sampling,
    conversation i's k-th sample draws from its own generator, seeded by `seeds[i]` and k (alignment.seeding)."""
    tokenizer.padding_side = "left"  # new tokens must line up at the right edge
    stop_ids = stop_token_ids(tokenizer)
    out: list[list[Completion]] = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=desc, unit="batch"):
        batch = conversations[start:start + batch_size]
        texts = [render(tokenizer, c, add_generation_prompt=True) for c in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        # K copies of each row instead of num_return_sequences, which greedy decoding refuses: sampling happens in
        # SeededSampler, so generate itself decodes greedily.
        enc = {k: v.repeat_interleave(num_samples, dim=0) for k, v in enc.items()}
        sampler = [] if temperature == 0 else [SeededSampler([sample_seed(s, k) for s in seeds[start:start + batch_size]
                                                              for k in range(num_samples)], temperature, top_p)]
        gen = model.generate(
            **enc, do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=sampler,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids),
        )
        new = gen[:, enc["input_ids"].shape[1]:].tolist()
        ends = [next((j for j, t in enumerate(ids) if t in stop_ids), len(ids)) for ids in new]  # first stop token
        samples = [Completion(decode_response(tokenizer, ids[:end]), end, "stop" if end < len(ids) else "length",
                              stop_reason_of(tokenizer, ids[end] if end < len(ids) else None))
                   for ids, end in zip(new, ends)]
        out += [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(batch))]
    return out


class TransformersBackend:
    retries = 0  # in-process: nothing to retry

    def __init__(self, model_path: str, *, batch_size: int, shard_size: int):
        self.model, self.tokenizer = load_policy(model_path)
        self.batch_size = batch_size
        self.shard_size = shard_size

    def generate(self, requests: list[Request]):
        for start in range(0, len(requests), self.shard_size):
            shard = requests[start:start + self.shard_size]
            # One sampling setting per call: the stage sends the same K and settings for every request. Each
            # request samples with its own seed, so its samples do not depend on the shard it landed in.
            r = shard[0]
            completions = sample(self.model, self.tokenizer, [q.messages for q in shard], num_samples=r.n,
                                 temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_tokens,
                                 batch_size=self.batch_size, seeds=[q.seed for q in shard],
                                 desc=f"generate {start}/{len(requests)}")
            for i, (q, cs) in enumerate(zip(shard, completions)):
                yield start + i, Result(cs, len(token_ids(self.tokenizer, q.messages, add_generation_prompt=True)))

    def lm_eval_model(self, path: Path, batch_size: int, seed: int):
        """lm-eval's `hf` model on this backend's loaded model and tokenizer."""
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size)
