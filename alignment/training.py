"""Pieces the SFT and DPO stages share: TrainingArguments fields, loss summaries, saving the final model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.chat import token_ids
from alignment.config import InputError
from alignment.stats import describe


def load_for_training(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def trainer_fields(cfg, out_dir: Path, seed: int) -> dict:
    """The TrainingArguments fields both trainers take from the recipe; names pass straight through to TRL."""
    # transformers 5 takes TensorBoard's folder from the environment; this process runs this one stage only.
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "logs")
    return dict(
        output_dir=str(out_dir / "trainer"), learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, max_length=cfg.max_length, logging_steps=cfg.logging_steps, seed=seed,
        data_seed=seed, save_strategy="no", report_to=list(cfg.report_to) or "none", disable_tqdm=False,
        dataloader_num_workers=0,
        # TRL defaults to bf16, which CPUs here cannot train in; use it exactly where the hardware supports it.
        bf16=bf16_supported(), use_cpu=not torch.cuda.is_available(),
    )


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def count_over_length(tokenizer, rows: list[dict], max_length: int, keys: tuple[str, ...]) -> int:
    """How many rows would be truncated: prompt plus the longest of `keys` rendered, over max_length tokens."""
    over = 0
    for r in rows:
        longest = max(len(token_ids(tokenizer, r["prompt"] + r[k])) for k in keys)
        over += longest > max_length
    return over


def check_prompts_fit(tokenizer, rows: list[dict], max_length: int, key: str, path: Path) -> None:
    """TRL silently drops rows whose prompt alone fills max_length; a recipe that would lose rows that way is
    bad input, named before any training."""
    lengths = [len(token_ids(tokenizer, r["prompt"], add_generation_prompt=True)) for r in rows]
    too_long = [i for i, n in enumerate(lengths) if n >= max_length]
    if too_long:
        raise InputError(f"{key}={max_length} is not longer than the prompt of {len(too_long)} of {len(rows)} rows "
                         f"of {path} (row {too_long[0] + 1}: {lengths[too_long[0]]} tokens; longest "
                         f"{max(lengths)}); raise {key} above the longest prompt")


def loss_summary(log_history: list[dict], key: str = "loss") -> dict:
    losses = [h[key] for h in log_history if key in h]
    out = {"steps": max([h.get("step", 0) for h in log_history], default=0), key: describe(losses)}
    if losses:
        out[f"first_{key}"], out[f"last_{key}"] = losses[0], losses[-1]
    return out


def save_model(trainer, tokenizer, path: Path) -> None:
    """The final model, its tokenizer (set up for generation), and the trainer's log history beside them."""
    trainer.save_model(str(path))
    (path.parent / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    tokenizer.padding_side = "left"  # the saved tokenizer is used for generation next
    tokenizer.save_pretrained(str(path))
