"""Reward model: a Bradley-Terry reward model trained each round, as Llama 3 did, on every preference pair the
rounds so far selected (plus any preference files the recipe names).

The model starts from the round's input model with a fresh scalar head (AutoModelForSequenceClassification,
one label) and trains with TRL's RewardTrainer, loss -log sigmoid(r_chosen - r_rejected), without a margin term.
A row with an `edited` response gives the ranking edited > chosen > rejected, i.e. three pairs. Pairs of a
held-out share of prompts (split by prompt id) are never trained on; pair accuracy on them is reported before
and after training. The next round scores with this model when the recipe says `reward_model: trained`.

    align stage reward_training --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from alignment.config import InputError
from alignment.prompts import read_jsonl
from alignment.rewards import reward_model_scores
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.template import load_tokenizer
from alignment.training import check_prompts_fit, loss_summary, train_runs, trainer_fields


def ranked_pairs(row: dict) -> list[dict]:
    """A preference row as (prompt, chosen, rejected) pairs: one, or three when an edited response ranks first."""
    pairs = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}]
    if row.get("edited"):
        pairs = [{"prompt": row["prompt"], "chosen": row["edited"], "rejected": row["chosen"]},
                 {"prompt": row["prompt"], "chosen": row["edited"], "rejected": row["rejected"]}] + pairs
    return [{**p, "prompt_id": row.get("prompt_id")} for p in pairs]


def read_preferences(path: Path) -> list[dict]:
    """Rows of an extra preference file, checked: prompt, chosen and rejected are message lists."""
    rows = []
    for i, row in enumerate(read_jsonl(path), 1):
        for key in ("prompt", "chosen", "rejected") + (("edited",) if row.get("edited") else ()):
            if not (isinstance(row.get(key), list) and row[key] and all(isinstance(m, dict) for m in row[key])):
                raise InputError(f"{path}: row {i}: {key} must be a non-empty list of messages")
        rows.append({**row, "prompt_id": row.get("prompt_id") or f"{path.name}:{i}"})
    return rows


def held_out(prompt_id: str, share: float) -> bool:
    """A stable, seed-free split by prompt id: the same prompt is held out in every round."""
    return int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def pair_accuracy(model_path: str, pairs: list[dict], batch_size: int) -> float | None:
    """Share of pairs whose chosen response the model scores higher than the rejected one."""
    if not pairs:
        return None
    convs = [p["prompt"] + p[k] for p in pairs for k in ("chosen", "rejected")]
    s = reward_model_scores(model_path, convs, batch_size)
    return sum(s[2 * i] > s[2 * i + 1] for i in range(len(pairs))) / len(pairs)


def run(config: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    cfg = config.reward_training
    rows = [r for path in inputs["pairs"] for r in read_jsonl(path)]  # one pairs file per round so far
    rows += [r for p in inputs.get("preferences", []) for r in read_preferences(Path(p))]  # declared inputs
    pairs = [p for r in rows for p in ranked_pairs(r)]
    train = [p for p in pairs if not held_out(p["prompt_id"], cfg.held_out_share)]
    test = [p for p in pairs if held_out(p["prompt_id"], cfg.held_out_share)]
    if not train:
        raise InputError(f"reward_model: no training pairs in {len(rows)} preference rows (the select stages "
                         "made no DPO pairs, or every prompt is held out); see select's drop counts")

    tokenizer = load_tokenizer(inputs["model"])
    check_prompts_fit(tokenizer, train, cfg.max_length, "reward_training.max_length", "the preference pairs")
    init = out_dir / "init"  # the input model with a fresh scalar head: also the "before" of the accuracy
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(inputs["model"], num_labels=1, dtype=torch.float32,
                                                               attn_implementation=cfg.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    before = pair_accuracy(str(init), test, cfg.per_device_train_batch_size)

    def build(run_dir: Path, seed: int):  # one run (the config refuses average_seeds), from the model above
        data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in train])
        return RewardTrainer(model=model, args=RewardConfig(**trainer_fields(cfg, run_dir, seed)),
                             train_dataset=data, processing_class=tokenizer)

    (history,), runs = train_runs(cfg, config.seed, out_dir, inputs["model"], build, padding_side="right")
    after = pair_accuracy(str(out_dir / "model"), test, cfg.per_device_train_batch_size)
    print(f"reward model: held-out pair accuracy {before} -> {after} on {len(test)} pairs", flush=True)
    return StageResult(
        outputs={"model": "model", "log_history": "log_history.json", "logs": "logs"},
        rows={"preference_rows": len(rows), "train_pairs": len(train), "held_out_pairs": len(test)},
        stats={**loss_summary(history), **runs, "held_out_pair_accuracy": after,
               "held_out_pair_accuracy_before": before, "pad_token": tokenizer.pad_choice,
               "last_train_accuracy": next((h["accuracy"] for h in reversed(history) if "accuracy" in h), None),
               "edited_rows": sum(bool(r.get("edited")) for r in rows)})
