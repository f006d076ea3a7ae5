"""Eval: the round's input model and its SFT and DPO checkpoints on the held-out prompts.

Per model, in `metrics.json`: greedy `accuracy` (verifier) and `mean_reward` (the recipe's combined reward);
`pass@k` from `eval.num_samples` sampled answers (unbiased estimator); `win_rate_vs_input`, the share of prompts
where the checkpoint's greedy answer out-scores the input model's (ties half); mean response length and its
drift against the input model; and the share of answers cut at the token limit. Every answer is kept in
`answers.jsonl`, keyed by model and prompt_id. Tasks of EleutherAI's lm-evaluation-harness named in
`eval.lm_eval_tasks` add `lm_eval/<task>/<metric>`.

    align eval 1 --recipe recipes/tiny.yaml        (make eval N=1)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignment import rewards
from alignment.config import Recipe
from alignment.generation import device, load_policy, sample
from alignment.manifest import write_json_atomic
from alignment.metrics import pass_at_k, win_rate
from alignment.prompts import read_prompts, write_jsonl
from alignment.stages.result import StageResult

MODELS = ("input", "sft", "dpo")


def answer_and_score(recipe: Recipe, model, tokenizer, prompts: list[dict], n: int, temperature: float, desc: str):
    """n answers per prompt (greedy when temperature is 0), each scored: a list per prompt of (completion, score)."""
    completions = sample(model, tokenizer, [p["messages"] for p in prompts], num_samples=n, temperature=temperature,
                         top_p=1.0, max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size,
                         seed=recipe.seed, desc=desc)
    flat = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    scored = rewards.score(recipe.reward, [p["messages"] + [{"role": "assistant", "content": c.text}] for p, c in flat],
                           [p.get("answer") for p, _ in flat])
    it = iter(zip((c for _, c in flat), scored))
    return [[next(it) for _ in range(n)] for _ in prompts]


def lm_eval_metrics(recipe: Recipe, model_path: Path) -> dict[str, float]:
    """The recipe's lm-evaluation-harness tasks on one model, with the model's own chat template."""
    if not recipe.eval.lm_eval_tasks:
        return {}
    import lm_eval  # heavy, and needed only when a recipe asks for it
    from lm_eval.tasks import TaskManager

    include = str(recipe.eval.lm_eval_include_path) if recipe.eval.lm_eval_include_path else None
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_path},dtype={dtype}", tasks=list(recipe.eval.lm_eval_tasks),
        task_manager=TaskManager(include_path=include), apply_chat_template=True, batch_size=recipe.eval.batch_size,
        limit=recipe.eval.lm_eval_limit, device=device(), random_seed=recipe.seed)["results"]
    return {f"lm_eval/{task}/{key}": value for task, res in results.items() for key, value in res.items()
            if isinstance(value, float) and "stderr" not in key}


def evaluate(recipe: Recipe, model_path: Path, prompts: list[dict], name: str) -> tuple[dict, list[dict]]:
    model, tokenizer = load_policy(str(model_path))
    greedy = [g[0] for g in answer_and_score(recipe, model, tokenizer, prompts, 1, 0.0, f"eval {name} greedy")]
    n = len(prompts)
    verified = recipe.reward.verifier is not None
    metrics = {
        "accuracy": sum(s["scores"]["verifier"] for _, s in greedy) / n if verified else None,
        "mean_reward": sum(s["reward"] for _, s in greedy) / n,
        "mean_response_tokens": sum(c.num_tokens for c, _ in greedy) / n,
        "hit_token_limit_share": sum(c.finish_reason == "length" for c, _ in greedy) / n,
        "num_prompts": n,
    }
    if verified and recipe.eval.num_samples:
        sampled = answer_and_score(recipe, model, tokenizer, prompts, recipe.eval.num_samples,
                                   recipe.eval.temperature, f"eval {name} pass@k")
        correct = [sum(int(s["scores"]["verifier"]) for _, s in group) for group in sampled]
        for k in recipe.eval.pass_k:
            metrics[f"pass@{k}"] = sum(pass_at_k(recipe.eval.num_samples, c, k) for c in correct) / n
    metrics.update(lm_eval_metrics(recipe, model_path))
    rows = [{"model": name, "prompt_id": p["prompt_id"], "response": c.text, "finish_reason": c.finish_reason, **s}
            for p, (c, s) in zip(prompts, greedy)]
    return metrics, rows


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    prompts = read_prompts(inputs["eval_prompts"], need_answer=recipe.reward.verifier is not None)
    prompts = prompts[:recipe.eval.num_prompts] if recipe.eval.num_prompts else prompts
    metrics, answers = {}, {}
    for name in MODELS:
        metrics[name], answers[name] = evaluate(recipe, inputs[name], prompts, name)
        metrics[name]["model_path"] = str(inputs[name])
    base = metrics["input"]
    reward = {name: {r["prompt_id"]: r["reward"] for r in answers[name]} for name in MODELS}
    ids = [p["prompt_id"] for p in prompts]
    for name in MODELS:
        metrics[name]["win_rate_vs_input"] = win_rate([reward[name][i] for i in ids], [reward["input"][i] for i in ids])
        metrics[name]["length_drift_vs_input"] = (metrics[name]["mean_response_tokens"]
                                                  / max(base["mean_response_tokens"], 1e-9) - 1.0)
    write_jsonl(out_dir / "answers.jsonl", [r for name in MODELS for r in answers[name]])
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(json.dumps({k: {m: v for m, v in d.items() if m != "model_path"} for k, d in metrics.items()}, indent=2))
    return StageResult(outputs={"metrics": "metrics.json", "answers": "answers.jsonl"},
                       rows={"prompts": len(prompts), "answers": sum(len(a) for a in answers.values())},
                       stats=metrics)
