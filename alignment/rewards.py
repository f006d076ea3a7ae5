"""Scorers and how they combine: verifiers (alignment.verifiers), a sequence-classification reward model, and
an LLM judge (alignment.judge).

Every sample keeps each scorer's value under its own name, whether it passed every verifier that applies to it,
and the combined `reward` the select stage ranks by.
"""

from __future__ import annotations

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

from alignment import verifiers
from alignment.config import InputError, ScoringConfig
from alignment.generation import spread
from alignment.template import load_tokenizer


@torch.inference_mode()
def reward_model_scores(path: str, conversations: list[list[dict]], batch_size: int,
                        sort_by_length: bool = True) -> list[float]:
    """Scalar rewards from a sequence-classification model, rendered with the reward model's own chat template.

    With `sort_by_length`, conversations are batched in order of length so a batch pads little (K samples of
    one prompt vary a lot in length); scores return in input order either way."""
    tokenizer = load_tokenizer(path, "reward.reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(path, **spread(torch.float32)).eval()
    if model.config.num_labels != 1:
        raise InputError(f"reward.reward_model.model_name_or_path: {path} has {model.config.num_labels} labels; "
                          "a reward model has exactly one")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort_by_length else list(range(len(ids)))
    scores = [0.0] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc="reward model", unit="batch"):
        idx = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(model.device)
        logits = model(**enc).logits[:, 0].tolist()
        for i, s in zip(idx, logits):
            scores[i] = s
    return scores


def combine(cfg: ScoringConfig, per_scorer: dict[str, list], weights: dict[str, float]) -> list[dict]:
    """Per sample: {"scores": {name: value}, "verified": bool | None, "passed": bool, "reward": float}.

    `verified` is whether every verifier that applies passed (None: none applies). weighted_sum adds weight x score
    over every present score, and every sample `passed`; gate_then_rank adds only the reward model and judge, and
    `passed` is False where a verifier failed: select ranks by `passed` first. An absent score (a verifier that does not apply, an unparseable
    verdict, no trained reward model yet) adds nothing."""
    verifier_names = {v.name for v in cfg.verifiers}
    n = len(next(iter(per_scorer.values()))) if per_scorer else 0
    out = []
    for i in range(n):
        s = {name: vals[i] for name, vals in per_scorer.items() if vals[i] is not None}
        checks = [s[name] for name in verifier_names if name in s]
        summed = [name for name in s if cfg.combine == "weighted_sum" or name not in verifier_names]
        verified = all(c == 1.0 for c in checks) if checks else None
        out.append({"scores": s, "verified": verified,
                    "passed": not (cfg.combine == "gate_then_rank" and verified is False),
                    "reward": float(sum(weights[name] * s[name] for name in summed))})
    return out


def score(cfg: ScoringConfig, prompts: list[dict], responses: list[str], *, reward_model: str | None = None,
          judge_verdicts: list[int | None] | None = None) -> list[dict]:
    """Score each (prompt row, response); `reward_model` is the resolved model path (None: not used) and
    `judge_verdicts` the judge's replies, already collected (None: no judge)."""
    per_scorer: dict[str, list] = verifiers.verify(cfg.verifiers, prompts, responses)
    weights = {v.name: v.weight for v in cfg.verifiers}
    if reward_model is not None:
        conversations = [p["messages"] + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        per_scorer["reward_model"] = reward_model_scores(reward_model, conversations, cfg.reward_model.batch_size,
                                                         cfg.reward_model.sort_by_length)
        weights["reward_model"] = cfg.reward_model.weight
    if judge_verdicts is not None:
        per_scorer["judge"] = [None if v is None else v / cfg.judge.max_score for v in judge_verdicts]
        weights["judge"] = cfg.judge.weight
    return combine(cfg, per_scorer, weights)
