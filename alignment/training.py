"""Pieces the training stages (SFT, DPO, reward model) share: loading (full, LoRA or QLoRA), TrainingArguments
fields, one training run per seed with checkpoint resume, weight averaging, loss summaries, saving a full model."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import sort_checkpoints

from alignment.chat import token_ids
from alignment.config import InputError
from alignment.model_folder import check_model_folder
from alignment.prompts import read_jsonl
from alignment.distribution import distribution
from alignment.template import END_OF_MESSAGE, check_end_of_message, load_tokenizer


def load_for_training(path: Path, cfg=None):
    """The model to train and its tokenizer, with the recipe's attention kernel; with
    `cfg.lora.quantize_base_4bit`, the base loads in 4-bit NF4."""
    tokenizer = load_tokenizer(path)
    kwargs = {"dtype": torch.float32} | ({} if cfg is None else {"attn_implementation": cfg.attn_implementation})
    if cfg is not None and cfg.lora and cfg.lora.quantize_base_4bit:
        from transformers import BitsAndBytesConfig

        kwargs |= {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), tokenizer


def peft_config(cfg):
    """peft's LoraConfig from the recipe, or None for full fine-tuning."""
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    # r, lora_alpha, lora_dropout and target_modules are peft's names and pass straight through
    return LoraConfig(**cfg.lora.model_dump(exclude={"quantize_base_4bit"}), task_type="CAUSAL_LM")


def trainer_fields(cfg, out_dir: Path, seed: int) -> dict:
    """The TrainingArguments fields every trainer takes from the recipe; names pass straight through to TRL."""
    return dict(
        output_dir=str(out_dir / "trainer"), learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # Under FSDP the recipe's gradient_checkpointing is FSDP's activation checkpointing instead (round.py passes
        # it to `accelerate launch`): transformers refuses the two together, and the Trainer's would all-gather every
        # layer's weights a second time in the backward pass.
        gradient_checkpointing=cfg.gradient_checkpointing and cfg.distributed != "fsdp",
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, max_length=cfg.max_length, logging_steps=cfg.logging_steps, seed=seed,
        data_seed=seed, report_to=list(cfg.report_to) or "none", disable_tqdm=False, dataloader_num_workers=0,
        # Checkpoints (the latest only) let a killed stage resume mid-training instead of starting over.
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        # TRL defaults to bf16, which CPUs here cannot train in; use it exactly where the hardware supports it.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), use_cpu=not torch.cuda.is_available(),
    )


def last_complete_checkpoint(trainer_dir: Path) -> str | None:
    """The newest checkpoint under `trainer_dir` that the Trainer finished writing, or None.

    A process killed while saving leaves a checkpoint folder without `trainer_state.json` (the Trainer writes it
    after the weights, optimizer and RNG states), and resuming from it fails. Such folders are removed so that the
    run restarts from the last whole checkpoint and rewrites them: by the main process alone (the others would
    delete the same files at once, and fail on the ones it deleted first), while the others wait for it."""
    newest_first = list(reversed(sort_checkpoints(str(trainer_dir))))  # none when the folder is missing
    whole = next((c for c in newest_first if (Path(c) / "trainer_state.json").exists()), None)
    if PartialState().is_main_process:
        for ckpt in newest_first[:newest_first.index(whole)] if whole else newest_first:
            print(f"removing {ckpt}: it was not completely written (no trainer_state.json)", flush=True)
            shutil.rmtree(ckpt)
    PartialState().wait_for_everyone()
    return whole


def train_runs(cfg, base_seed: int, out_dir: Path, model_path: Path, build,
               padding_side: str = "left") -> tuple[list, dict]:
    """Train once per seed of `cfg.average_seeds` (or once with `base_seed`), each run resuming from its last
    checkpoint if an earlier attempt left one, and leave the final full model in out_dir/model (the weight
    average when there are several runs; its tokenizer pads on `padding_side`). `build(run_dir, seed)` returns a
    ready trainer. Returns each run's log history and statistics about resuming and averaging."""
    seeds = list(cfg.average_seeds) or [base_seed]
    histories, resumed, run_models = [], {}, []
    for seed in seeds:
        run_dir = out_dir if len(seeds) == 1 else out_dir / "runs" / f"seed-{seed}"
        # transformers 5 reads TensorBoard's folder from the environment as the trainer is built (a stage per process)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "logs")
        trainer = build(run_dir, seed)
        ckpt = last_complete_checkpoint(run_dir / "trainer")
        if ckpt:
            print(f"resuming seed {seed} from {ckpt}", flush=True)
            resumed[seed] = int(Path(ckpt).name.split("-")[-1])
        trainer.train(resume_from_checkpoint=ckpt)
        save_model(trainer, trainer.processing_class, run_dir / "model", model_path, padding_side)
        histories.append(trainer.state.log_history)
        run_models.append(run_dir / "model")
    # Averaging, moving and deleting are the main process's alone: every rank of a distributed stage runs this
    # code on the same folders, and a second rank would move logs that are gone or delete what the first reads.
    if PartialState().is_main_process:
        if len(seeds) > 1:
            average_models(run_models, out_dir / "model")
            (out_dir / "log_history.json").write_text(json.dumps(histories[0], indent=1))
            for seed in seeds:  # one TensorBoard folder for the stage, a run per seed
                shutil.move(out_dir / "runs" / f"seed-{seed}" / "logs", out_dir / "logs" / f"seed-{seed}")
        # Checkpoints (with optimizer states, ~100 GB at 8B) serve resuming, and are the only copy of the weights
        # until the final model is known to load: a save that came out incomplete keeps them.
        check_model_folder(out_dir / "model", "the trained model")
        if not cfg.keep_checkpoints:
            for folder in [out_dir / "trainer", out_dir / "runs"]:
                shutil.rmtree(folder, ignore_errors=True)
    PartialState().wait_for_everyone()
    return histories, {"seeds": seeds, "resumed_from_step": resumed, "averaged_runs": len(seeds),
                       "checkpoints_kept": cfg.keep_checkpoints}


def average_models(paths: list[Path], out: Path) -> None:
    """Uniform average of the weights of models with one architecture (Llama 3's model averaging); the first
    model's config and tokenizer go with it."""
    model = AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32)
    total = {k: v.clone() for k, v in model.state_dict().items()}
    for p in paths[1:]:
        other = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict()
        for k in total:
            total[k] += other[k]
    model.load_state_dict({k: v / len(paths) for k, v in total.items()})
    model.save_pretrained(out)
    load_tokenizer(paths[0]).save_pretrained(out)


def newest_first(rounds: list[tuple[str, Path]], fields: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Rows of several rounds' select outputs, newest round first; a row whose `fields` repeat one already taken
    (the same prompt and answers in an earlier round) is kept once, the newest. With the rows taken per round."""
    seen, rows, counts = set(), [], {}
    for name, path in rounds:
        new = []
        for i, r in enumerate(read_jsonl(Path(path)), 1):
            k = json.dumps([r[f] for f in fields], sort_keys=True)
            if k not in seen:
                seen.add(k)
                new.append({**r, "_where": (str(path), i)})
        counts[name] = {"rows": len(new)}
        rows += new
    return rows, counts


def selected_rows(rows: list[dict] | None, path: Path, what: str, model_path: Path, max_length: int, key: str,
                  keys: tuple[str, ...]):
    """The rows for SFT or DPO (the select stage's at `path` when `rows` is None), the input model's tokenizer (the
    model itself loads per run), how many rows would be truncated (prompt plus the longest of `keys` rendered, over
    max_length tokens), and how many rows holding a tool-call step were left out because the model's template
    cannot end one with <|eom_id|>.

    Such a step is trained with the ending the teacher wrote, or not at all: Llama 3.1's Hub template ends a
    message with <|eom_id|> by its `builtin_tools` argument, never per message, so a teacher sample that happens to
    end on <|eom_id|> (a 405B calling a tool nobody offered it) is left out, counted and named, rather than
    trained as a finished turn or stopping the round. Every row of that kind left out is an error: the recipe is
    meant to train tool calls, and this template cannot."""
    rows = read_jsonl(path) if rows is None else rows
    if not rows:
        raise InputError(f"{path}: no {what} were selected; see the select stage's drop counts")
    tokenizer = load_tokenizer(model_path)
    steps = [any(m.get("stop_reason") == END_OF_MESSAGE for k in ("prompt", *keys) for m in r[k]) for r in rows]
    dropped = 0
    if any(steps):
        try:
            check_end_of_message(tokenizer, str(model_path))  # tool-call steps: trained with the ending they had
        except InputError as e:
            if all(steps):
                raise
            rows, dropped = [r for r, step in zip(rows, steps) if not step], sum(steps)
            print(f"warning: {dropped} of {len(steps)} {what} hold a tool-call step and are left out: {e}", flush=True)
    check_prompts_fit(tokenizer, rows, max_length, key, path)
    over = sum(max(len(token_ids(tokenizer, r["prompt"] + r[k])) for k in keys) > max_length for r in rows)
    return rows, tokenizer, over, dropped


def shared_dataset(rows: list[dict], folder: Path, args):
    """The rows as a Dataset saved in `folder` by the main process and read from there by every rank. TRL's DPO
    reference pass writes its log-probs next to the dataset's files, on the main process, and every rank then reads
    that file; a dataset built in memory keeps such files in a temporary folder of each process's own, which the
    other ranks cannot see (TRL 1.16 with precompute_ref_log_probs under 2 or more processes: FileNotFoundError).
    Ranks are told apart by the stage's TrainingArguments (`args`), which set up the process group: accelerate's
    state read before them takes every process on CPUs for the main one, and both would write the folder."""
    from datasets import Dataset, load_from_disk

    with args.main_process_first(local=False, desc="the preference pairs"):
        if args.process_index == 0:
            shutil.rmtree(folder, ignore_errors=True)  # (a killed run's)
            Dataset.from_list(rows).save_to_disk(str(folder))
    return load_from_disk(str(folder))


def check_prompts_fit(tokenizer, rows: list[dict], max_length: int, key: str, path: Path) -> None:
    """TRL silently drops rows whose prompt alone fills max_length; a recipe that would lose rows that way is
    bad input, named before any training."""
    lengths = [len(token_ids(tokenizer, r["prompt"], add_generation_prompt=True)) for r in rows]
    too_long = [i for i, n in enumerate(lengths) if n >= max_length]
    if too_long:
        # rows assembled from several files (earlier rounds, extra sources) carry their own file and row
        src, line = rows[too_long[0]].get("_where") or (path, too_long[0] + 1)
        raise InputError(f"{key}={max_length} is not longer than the prompt of {len(too_long)} of {len(rows)} rows "
                         f"of {src} (row {line}: {lengths[too_long[0]]} tokens; longest "
                         f"{max(lengths)}); raise {key} above the longest prompt")


def loss_summary(log_history: list[dict], key: str = "loss") -> dict:
    losses = [h[key] for h in log_history if key in h]
    out = {"steps": max([h.get("step", 0) for h in log_history], default=0), key: distribution(losses)}
    if losses:
        out[f"first_{key}"], out[f"last_{key}"] = losses[0], losses[-1]
    return out


def save_model(trainer, tokenizer, path: Path, base_path: Path | None = None, padding_side: str = "left") -> None:
    """The final model as an ordinary full checkpoint, its tokenizer (padding on `padding_side`: left where a
    policy generates next) and the trainer's log history beside it. LoRA adapters are kept in `adapter/` and merged
    into a full-precision copy of the base, so the next stage and round need no peft (a 4-bit base is not merged).
    Every process calls it: under FSDP or ZeRO-3 the weights are gathered from all of them; the main one writes."""
    from peft import PeftModel

    peft = isinstance(trainer.model, PeftModel) or hasattr(trainer.model, "peft_config")
    target = path.parent / "adapter" if peft else path
    with full_state_dict(trainer):
        trainer.save_model(str(target))
    if not trainer.is_world_process_zero():
        return
    # The Trainer pickles its arguments (the absolute output_dir among them) beside the weights: a record of how
    # the run trained, not part of the model, whose identity must not depend on where the run folder lies.
    (path.parent / "logs").mkdir(parents=True, exist_ok=True)
    if (target / TRAINING_ARGS_NAME).exists():
        shutil.move(target / TRAINING_ARGS_NAME, path.parent / "logs" / TRAINING_ARGS_NAME)
    if peft:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        PeftModel.from_pretrained(base, str(target)).merge_and_unload().save_pretrained(str(path))
    (path.parent / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    tokenizer.padding_side = padding_side
    tokenizer.save_pretrained(str(path))


@contextmanager
def full_state_dict(trainer):
    """Under FSDP, the Trainer's save_model gathers one full state dict onto the main process (accelerate's
    get_state_dict) and saves it with save_pretrained; with the sharded type it writes no weights at all.
    Checkpoints stay sharded (each rank writes its part: fast, and what resuming reads), also for the next seed's
    trainer, which shares accelerate's state."""
    if not trainer.is_fsdp_enabled:
        yield
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    kept = {k: getattr(plugin, k) for k in ("state_dict_type", "state_dict_config", "optim_state_dict_config")}
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        for k, v in kept.items():
            setattr(plugin, k, v)
