"""The transformers backend: batched `generate` in the stage's own process, for machines without vLLM."""

from __future__ import annotations

from alignment.backends import Request, Result
from alignment.chat import token_ids
from alignment.generation import load_policy, sample


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
