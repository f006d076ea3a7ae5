"""SFT: fine-tune the round's input model on the rejection-sampled best responses (TRL SFTTrainer).

Rows are prompt-completion conversations, so the loss falls on the response tokens only: the prompt, rendered
with the chat template and its generation header, is masked, as in Llama 3.

    align stage sft --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignment.config import InputError, Recipe
from alignment.prompts import read_jsonl
from alignment.stages.result import StageResult
from alignment.training import count_over_length, load_for_training, loss_summary, save_model, trainer_fields


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    rows = read_jsonl(inputs["sft"])
    if not rows:
        raise InputError(f"{inputs['sft']}: no SFT examples were selected; see the select stage's drop counts")
    model, tokenizer = load_for_training(inputs["model"])
    over = count_over_length(tokenizer, rows, recipe.sft.max_length, ("completion",))
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = SFTConfig(**trainer_fields(recipe.sft, out_dir, recipe.seed), completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    save_model(trainer, tokenizer, out_dir / "model")
    return StageResult(outputs={"model": "model", "log_history": "log_history.json", "logs": "logs"}, rows={"examples": len(rows), "truncated": over},
                       stats=loss_summary(trainer.state.log_history))
