"""DPO: preference-tune the round's SFT model on best-versus-worst pairs (TRL DPOTrainer).

Llama 3 settings by default: beta 0.1, and an NLL term on the chosen response with weight 0.2 (TRL's extra `sft`
loss). Formatting tokens (Llama 3's headers and `<|eot_id|>`; whatever special tokens the model's own chat
template writes, alignment.template) are taken out of every loss term on both responses: the paper found that
their shared presence in chosen and rejected pulls the two objectives against each other and teaches tail
repetition or early stops. The reference model is the
SFT model itself unless `dpo.ref_model_name_or_path` names another; its log-probabilities are computed once
before training (`dpo.precompute_ref_log_probs`, on by default), so no second model runs during the steps.

    align stage dpo --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from alignment.config import InputError
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.distribution import distribution
from alignment.template import formatting_token_ids
from alignment.training import (load_for_training, loss_summary, newest_first, peft_config, selected_rows,
                                shared_dataset, train_runs, trainer_fields)


class MaskFormattingTokens:
    """TRL's preference collator, with formatting tokens removed from `completion_mask`, the mask every DPO loss
    term (and the reference log-probabilities) sums over. Attention still sees them."""

    def __init__(self, collator, token_ids: list[int]):
        self.collator = collator
        self.token_ids = torch.tensor(token_ids)
        self.masked_per_batch: list[int] = []  # completion tokens taken out, for the stage's statistics

    def __call__(self, examples):
        batch = self.collator(examples)
        keep = ~torch.isin(batch["input_ids"], self.token_ids)
        self.masked_per_batch.append(int((batch["completion_mask"].bool() & ~keep).sum()))
        batch["completion_mask"] = batch["completion_mask"] * keep.to(batch["completion_mask"].dtype)
        return batch


def build_trainer(config: StageConfig, model, tokenizer, rows: list[dict], out_dir: Path, ref_model=None,
                  seed: int | None = None) -> DPOTrainer:
    cfg = config.dpo
    args = DPOConfig(**trainer_fields(cfg, out_dir, config.seed if seed is None else seed), beta=cfg.beta,
                     loss_type=list(cfg.loss_type), loss_weights=list(cfg.loss_weights),
                     precompute_ref_log_probs=cfg.precompute_ref_log_probs)
    data = shared_dataset([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows],
                          out_dir / "trainer" / "dataset", args)  # (with the checkpoints: kept or removed with them)
    model.config.pad_token_id = tokenizer.pad_token_id  # what TRL does when it builds the collator itself
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                         truncation_mode=args.truncation_mode,
                                         pad_to_multiple_of=args.pad_to_multiple_of)
    if cfg.mask_formatting_tokens:
        collator = MaskFormattingTokens(collator, masked_ids(tokenizer))
    # With LoRA and no separate reference, TRL's reference is the policy with its adapters off: the SFT model.
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=collator, peft_config=peft_config(cfg))


def masked_ids(tokenizer) -> list[int]:
    ids = formatting_token_ids(tokenizer)
    if not ids:  # masking would silently do nothing while the manifest says it is on
        raise InputError(f"dpo.mask_formatting_tokens: {tokenizer.name_or_path}'s chat template writes no special "
                         "token around contents, so there is nothing to mask; set it to false")
    return ids


def log_probs(history: list[dict], beta: float) -> list[dict]:
    """Per logging step, the mean log-probability of chosen and rejected responses under the policy and under the
    reference. TRL logs the policy's and the rewards beta * (policy - reference), both as batch means, so the
    reference's mean is exact. Both policy values falling is DPO pushing probability off the chosen answers too."""
    return [{"step": h["step"], "policy_chosen": h["logps/chosen"], "policy_rejected": h["logps/rejected"],
             "ref_chosen": h["logps/chosen"] - h["rewards/chosen"] / beta,
             "ref_rejected": h["logps/rejected"] - h["rewards/rejected"] / beta}
            for h in history if "logps/chosen" in h and "rewards/chosen" in h and "step" in h]


def assemble(cfg, inputs: dict, round_n: int) -> tuple[list[dict], dict]:
    """The round's pairs: this round's, the last `dpo.accumulate` rounds' (a pair repeated across rounds kept once,
    the newest), then each preference file's rows that reach its `min_strength`. With the count per source."""
    from alignment.stages.reward_training import read_preferences  # the same checks as the reward model's files

    earlier = inputs.get("earlier_pairs", [])
    rounds = [(f"round {round_n}", inputs["pairs"])] + [(f"round {round_n - 1 - i}", p) for i, p in enumerate(earlier)]
    rounds += [(f"round {round_n - i} dialogs", p) for i, p in enumerate(inputs.get("dialogs_pairs", []))]
    rows, sources = newest_first(rounds, ("prompt", "chosen", "rejected"))
    for spec, path in zip(cfg.preference_sources, inputs.get("preferences", [])):
        own = read_preferences(Path(path))
        if spec.min_strength is not None:
            if missing := [i for i, r in enumerate(own, 1) if isinstance(r.get("strength"), bool)
                           or not isinstance(r.get("strength"), (int, float))]:
                raise InputError(f"{path}: row {missing[0]}: no numeric `strength`, which dpo.preference_sources"
                                 f"[{spec.path}].min_strength filters on ({len(missing)} rows lack one)")
        kept = [(i, r) for i, r in enumerate(own, 1) if spec.min_strength is None or r["strength"] >= spec.min_strength]
        sources[str(spec.path)] = {"rows": len(own), "kept": len(kept)}
        rows += [{**{k: r[k] for k in ("prompt", "chosen", "rejected")}, "_where": (str(path), i)} for i, r in kept]
    return rows, sources


def run(config: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    cfg = config.dpo
    rows, sources = assemble(cfg, inputs, round_n)
    rows, tokenizer, over, left_out = selected_rows(rows, inputs["pairs"], "preference pairs", inputs["model"], cfg.max_length,
                                          "dpo.max_length", ("chosen", "rejected"))
    masked = masked_ids(tokenizer) if cfg.mask_formatting_tokens else []

    counts: list[int] = []

    def build(run_dir: Path, seed: int):
        model, tok = load_for_training(inputs["model"], cfg)
        ref_model = load_for_training(inputs["ref_model"])[0] if "ref_model" in inputs else None
        trainer = build_trainer(config, model, tok, rows, run_dir, ref_model, seed)
        if isinstance(trainer.data_collator, MaskFormattingTokens):
            trainer.data_collator.masked_per_batch.clear()  # the reference pass (precompute) drew batches already
            counts.append(trainer.data_collator.masked_per_batch)  # filled as training draws batches
        return trainer

    histories, runs = train_runs(cfg, config.seed, out_dir, inputs["model"], build)
    history = histories[0]
    stats = {**loss_summary(history), **runs, "lora": cfg.lora is not None, "pad_token": tokenizer.pad_choice,
             "formatting_tokens": {"masked": cfg.mask_formatting_tokens,
                                   "ids": {i: tokenizer.convert_ids_to_tokens(i) for i in masked},
                                   "masked_per_batch": distribution([n for c in counts for n in c])}}
    for key in ("rewards/margins", "rewards/accuracies"):
        stats.update({k: v for k, v in loss_summary(history, key).items() if k != "steps"})
    stats["log_probs"] = log_probs(history, cfg.beta)
    if len(sources) > 1:
        stats["sources"] = sources
    return StageResult(outputs={"model": "model", "log_history": "log_history.json", "logs": "logs"},
                       rows={"pairs": len(rows), "truncated": over, "tool_call_steps_left_out": left_out},
                       stats=stats)
