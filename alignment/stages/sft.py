"""SFT: fine-tune the round's input model on the rejection-sampled best responses (TRL SFTTrainer).

Rows are prompt-completion conversations, so the loss falls on the response tokens only: the prompt, rendered
with the chat template and its generation header, is masked, as in Llama 3. Optional: packing (padding-free),
LoRA/QLoRA adapters merged into a full model at the end, several seeds averaged, multi-process training through
`accelerate launch`. An interrupted run resumes from its last checkpoint.

    align stage sft --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.training import load_for_training, loss_summary, peft_config, selected_rows, train_runs, trainer_fields


def build_trainer(recipe: StageConfig, model, tokenizer, rows: list[dict], out_dir: Path, seed: int | None = None):
    cfg = recipe.sft
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    # Packing uses TRL's best-fit decreasing: whole examples per row (none cut), padding-free. transformers reads
    # the restarting position ids as example boundaries and masks attention per example, with SDPA too.
    args = SFTConfig(**trainer_fields(cfg, out_dir, recipe.seed if seed is None else seed),
                     completion_only_loss=True, packing=cfg.packing, packing_strategy="bfd")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=peft_config(cfg))


def run(recipe: StageConfig, inputs: dict, out_dir: Path, round_n: int) -> StageResult:
    cfg = recipe.sft
    rows, tokenizer, over = selected_rows(inputs["sft"], "SFT examples", inputs["model"], cfg.max_length,
                                          "sft.max_length", ("completion",))

    def build(run_dir: Path, seed: int):
        model, tok = load_for_training(inputs["model"], cfg)  # each run starts from the same weights
        return build_trainer(recipe, model, tok, rows, run_dir, seed)

    histories, runs = train_runs(cfg, recipe.seed, out_dir, inputs["model"], build)
    stats = {**loss_summary(histories[0]), **runs, "lora": cfg.lora is not None, "packing": cfg.packing,
             "pad_token": tokenizer.pad_choice}
    if len(histories) > 1:
        stats["last_loss_per_run"] = [loss_summary(h).get("last_loss") for h in histories]
    return StageResult(outputs={"model": "model", "log_history": "log_history.json", "logs": "logs"},
                       rows={"examples": len(rows), "truncated": over}, stats=stats)
