"""Batched sampling with transformers: the embedded backend, for machines without vLLM.

Used by the generate stage (K samples per prompt) and by evaluation (greedy). Each sample reports how it ended:
`stop` when the model wrote its end-of-turn token, `length` when it hit max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.chat import render


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" or "length"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # CPUs here compute bf16 slowly
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device())
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def sample(model, tokenizer, conversations: list[list[dict]], *, num_samples: int, temperature: float,
           top_p: float, max_new_tokens: int, batch_size: int, seed: int, desc: str) -> list[list[Completion]]:
    """`num_samples` completions for each conversation, in input order; temperature 0 is greedy."""
    tokenizer.padding_side = "left"  # new tokens must line up at the right edge
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eom_id|>")} - {None}
    greedy = temperature == 0
    out: list[list[Completion]] = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=desc, unit="batch"):
        batch = conversations[start:start + batch_size]
        texts = [render(tokenizer, c, add_generation_prompt=True) for c in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(seed + start)  # a batch's samples do not depend on which batches ran before it
        gen = model.generate(
            **enc, do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
            top_k=None, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids),
        )
        new = gen[:, enc.input_ids.shape[1]:].tolist()
        for i in range(len(batch)):
            row = []
            for ids in new[i * num_samples:(i + 1) * num_samples]:
                ended = next((j for j, t in enumerate(ids) if t in stop_ids), None)
                ids = ids[:ended] if ended is not None else ids
                row.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), len(ids),
                                      "stop" if ended is not None else "length"))
            out.append(row)
    return out
