"""Scorers and how they combine: verifiers (alignment.verifiers), a sequence-classification reward model, and
an LLM judge (alignment.judge).

Every sample keeps each scorer's value under its own name, whether it passed every verifier that applies to it,
and the combined `reward` the select stage ranks by.
"""

from __future__ import annotations

from contextlib import closing, contextmanager
from typing import Iterator

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

from alignment import verifiers
from alignment.chat import token_ids
from alignment.config import EngineConfig, InputError, RewardModelConfig, ScoringConfig
from alignment.template import load_tokenizer


class RewardModel:
    """A sequence-classification reward model, loaded once per stage and called on every batch of conversations,
    rendered with its own chat template. In bf16 on GPU, where `device_map="sequential"` fills the first GPU and
    spreads over the next only what does not fit; in fp32 on CPU, where bf16 is slow.

    With `sort_by_length`, conversations are batched in order of length so a batch pads little (K samples of
    one prompt vary a lot in length); scores return in input order either way."""

    def __init__(self, path: str, batch_size: int, sort_by_length: bool = True):
        self.tokenizer = load_tokenizer(path, "reward.reward_model")
        gpu = torch.cuda.is_available()
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.bfloat16 if gpu else torch.float32, device_map="sequential" if gpu else None).eval()
        check_one_label(path, self.model.config.num_labels)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.batch_size, self.sort_by_length = batch_size, sort_by_length

    @torch.inference_mode()
    def __call__(self, conversations: list[list[dict]]) -> list[float]:
        ids = [token_ids(self.tokenizer, c) for c in conversations]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if self.sort_by_length else list(range(len(ids)))
        scores = [0.0] * len(ids)
        for start in tqdm(range(0, len(order), self.batch_size), desc="reward model", unit="batch"):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(self.model.device)
            for i, s in zip(idx, self.model(**enc).logits[:, 0].float().tolist()):
                scores[i] = s
        return scores

    def close(self) -> None:
        del self.model


class VLLMRewardModel(RewardModel):
    """The same reward model in vLLM's pooling engine (`LLM.classify` on the last token, no activation): the
    conversations' token ids are ours, so both engines score the same tokens."""

    def __init__(self, path: str, engine: EngineConfig):
        from vllm import LLM

        from alignment.backends.vllm_engine import engine_kwargs

        self.tokenizer = load_tokenizer(path, "reward.reward_model")
        self.llm = LLM(model=path, runner="pooling", **engine_kwargs(engine))
        check_one_label(path, self.llm.llm_engine.model_config.hf_config.num_labels)

    def __call__(self, conversations: list[list[dict]]) -> list[float]:
        from vllm import PoolingParams

        out = self.llm.classify([{"prompt_token_ids": token_ids(self.tokenizer, c)} for c in conversations],
                                pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return [o.outputs.probs[0] for o in out]

    def close(self) -> None:
        from alignment.backends.vllm_engine import shutdown

        shutdown(self.llm)


def check_one_label(path: str, num_labels: int) -> None:
    if num_labels != 1:
        raise InputError(f"reward.reward_model.model_name_or_path: {path} has {num_labels} labels; "
                         "a reward model has exactly one")


@contextmanager
def open_reward_model(cfg: RewardModelConfig, path: str | None, engine: EngineConfig) -> Iterator[RewardModel | None]:
    """The recipe's reward model on its backend (None when there is none yet), closed on exit."""
    if path is None:
        yield None
        return
    with closing(VLLMRewardModel(path, engine) if cfg.backend == "vllm"
                 else RewardModel(path, cfg.batch_size, cfg.sort_by_length)) as rm:
        yield rm


def reward_model_scores(path: str, conversations: list[list[dict]], batch_size: int,
                        sort_by_length: bool = True) -> list[float]:
    """Scores from a reward model loaded for this one call (the reward_training stage's held-out pairs)."""
    return RewardModel(path, batch_size, sort_by_length)(conversations)


def combine(cfg: ScoringConfig, per_scorer: dict[str, list], weights: dict[str, float]) -> list[dict]:
    """Per sample: {"scores": {name: value}, "verified": bool | None, "passed": bool, "reward": float}.

    `verified` is whether every verifier that applies passed (None: none applies). weighted_sum adds weight x score
    over every present score, and every sample `passed`; gate_then_rank adds only the reward model and judge, and
    `passed` is False where a verifier failed: select ranks by `passed` first. An absent score (a verifier that does
    not apply, an unparseable verdict, no trained reward model yet) adds nothing."""
    verifier_names = {v.name for v in cfg.verifiers}
    out = []
    for values in zip(*per_scorer.values()):  # one sample's score by each scorer
        s = {name: v for name, v in zip(per_scorer, values) if v is not None}
        checks = [s[name] for name in verifier_names if name in s]
        summed = [name for name in s if cfg.combine == "weighted_sum" or name not in verifier_names]
        verified = all(c == 1.0 for c in checks) if checks else None
        out.append({"scores": s, "verified": verified,
                    "passed": not (cfg.combine == "gate_then_rank" and verified is False),
                    "reward": float(sum(weights[name] * s[name] for name in summed))})
    return out


def score(cfg: ScoringConfig, prompts: list[dict], responses: list[str], *, reward_model: RewardModel | None = None,
          judge_verdicts: list[int | None] | None = None, checks: dict[str, dict] | None = None) -> list[dict]:
    """Score each (prompt row, response); `reward_model` is the loaded model (None: not used) and
    `judge_verdicts` the judge's replies, already collected (None: no judge). `checks` receives the code
    verifiers' counts of checks decided outside and inside the candidate's process (`verifiers.verify`)."""
    per_scorer: dict[str, list] = verifiers.verify(cfg.verifiers, prompts, responses, checks)
    weights = {v.name: v.weight for v in cfg.verifiers}
    if reward_model is not None:
        conversations = [p["messages"] + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        per_scorer["reward_model"] = reward_model(conversations)
        weights["reward_model"] = cfg.reward_model.weight
    if judge_verdicts is not None:
        per_scorer["judge"] = [None if v is None else v / cfg.judge.max_score for v in judge_verdicts]
        weights["judge"] = cfg.judge.weight
    return combine(cfg, per_scorer, weights)
