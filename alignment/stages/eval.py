"""Eval: greedy answers to the held-out prompts from the round's input model and its SFT and DPO models.

`metrics.json` maps each model (`input`, `sft`, `dpo`) to held-out `accuracy` (verifier), `mean_reward` (the
recipe's combined reward), mean response length and the share of answers cut at the token limit. Every answer
is kept in `answers.jsonl`, keyed by model and prompt_id, for a closer look.

    align stage eval --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

import json
from pathlib import Path

from alignment import rewards
from alignment.config import Recipe
from alignment.generation import load_policy, sample
from alignment.manifest import write_json_atomic
from alignment.prompts import read_prompts, write_jsonl
from alignment.stages.result import StageResult

MODELS = ("input", "sft", "dpo")


def evaluate(recipe: Recipe, model_path: Path, prompts: list[dict], name: str) -> tuple[dict, list[dict]]:
    model, tokenizer = load_policy(str(model_path))
    answers = [cs[0] for cs in sample(
        model, tokenizer, [p["messages"] for p in prompts], num_samples=1, temperature=0.0, top_p=1.0,
        max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size, seed=recipe.seed,
        desc=f"eval {name}")]
    conversations = [p["messages"] + [{"role": "assistant", "content": a.text}] for p, a in zip(prompts, answers)]
    scored = rewards.score(recipe.reward, conversations, [p.get("answer") for p in prompts])
    n = len(prompts)
    metrics = {
        "accuracy": sum(s["scores"]["verifier"] for s in scored) / n if recipe.reward.verifier else None,
        "mean_reward": sum(s["reward"] for s in scored) / n,
        "mean_response_tokens": sum(a.num_tokens for a in answers) / n,
        "hit_token_limit_share": sum(a.finish_reason == "length" for a in answers) / n,
        "num_prompts": n,
    }
    rows = [{"model": name, "prompt_id": p["prompt_id"], "response": a.text, "finish_reason": a.finish_reason,
             **s} for p, a, s in zip(prompts, answers, scored)]
    return metrics, rows


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    prompts = read_prompts(inputs["eval_prompts"], need_answer=recipe.reward.verifier is not None)
    prompts = prompts[:recipe.eval.num_prompts] if recipe.eval.num_prompts else prompts
    metrics, answer_rows = {}, []
    for name in MODELS:
        metrics[name], rows = evaluate(recipe, inputs[name], prompts, name)
        metrics[name]["model_path"] = str(inputs[name])
        answer_rows += rows
    write_jsonl(out_dir / "answers.jsonl", answer_rows)
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(json.dumps({k: {m: v for m, v in d.items() if m != "model_path"} for k, d in metrics.items()}, indent=2))
    return StageResult(outputs={"metrics": "metrics.json", "answers": "answers.jsonl"},
                       rows={"prompts": len(prompts), "answers": len(answer_rows)}, stats=metrics)
