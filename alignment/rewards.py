"""Scorers: a rule-based verifier and a sequence-classification reward model, combined as a weighted sum.

Every sample keeps each scorer's value under its own name, next to the combined `reward`.
"""

from __future__ import annotations

import re

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignment.config import InputError, RewardConfig
from alignment.generation import device


def verify_answer(response: str, answer: str, answer_regex: str) -> float:
    """1.0 when the last match of `answer_regex` in the response equals the reference answer, else 0.0.

    The last match, because a worked answer restates the operands first ("12 + 7 = 19")."""
    found = re.findall(answer_regex, response)
    if not found:
        return 0.0
    last = found[-1] if isinstance(found[-1], str) else found[-1][0]  # a regex with groups yields tuples
    return 1.0 if last.strip() == answer.strip() else 0.0


@torch.inference_mode()
def reward_model_scores(path: str, conversations: list[list[dict]], batch_size: int) -> list[float]:
    """Scalar rewards from a sequence-classification model, rendered with the reward model's own chat template.

    Conversations are batched in order of length so a batch pads little; scores return in input order."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device()).eval()
    if model.config.num_labels != 1:
        raise InputError(f"reward.reward_model.model_name_or_path: {path} has {model.config.num_labels} labels; "
                          "a reward model has exactly one")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = [0.0] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc="reward model", unit="batch"):
        idx = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(model.device)
        logits = model(**enc).logits[:, 0].tolist()
        for i, s in zip(idx, logits):
            scores[i] = s
    return scores


def score(cfg: RewardConfig, conversations: list[list[dict]], answers: list[str | None]) -> list[dict]:
    """Per conversation (whose last message is the response): {"scores": {name: value}, "reward": weighted sum}."""
    per_scorer: dict[str, list[float]] = {}
    weights: dict[str, float] = {}
    if cfg.verifier is not None:
        per_scorer["verifier"] = [verify_answer(c[-1]["content"], a, cfg.verifier.answer_regex)
                                  for c, a in zip(conversations, answers)]
        weights["verifier"] = cfg.verifier.weight
    if cfg.reward_model is not None:
        rm = cfg.reward_model
        per_scorer["reward_model"] = reward_model_scores(rm.model_name_or_path, conversations, rm.batch_size)
        weights["reward_model"] = rm.weight
    out = []
    for i in range(len(conversations)):
        s = {name: vals[i] for name, vals in per_scorer.items()}
        out.append({"scores": s, "reward": sum(weights[n] * v for n, v in s.items())})
    return out
