"""Eval: the round's input model and its SFT and DPO checkpoints on the held-out prompts.

Per model, in `metrics.json`: greedy `accuracy` (verifier) and `mean_reward` (the recipe's combined reward);
`pass@k` from `eval.num_samples` sampled answers (unbiased estimator); `win_rate_vs_input`, the share of prompts
where the checkpoint's greedy answer out-scores the input model's (ties half); mean response length and its
drift against the input model; and the share of answers cut at the token limit. Each of accuracy, mean reward,
pass@k and win rate has its 95% interval beside it as `<metric>_ci: [lo, hi]` (Wilson for accuracy, a seeded
bootstrap over prompts for the others), since 3 points on 300 prompts are within noise. Every greedy answer is kept
in `answers.jsonl`, keyed by model and prompt_id, with the prompt's count of correct sampled answers
(`num_correct` of `num_samples`) where pass@k was measured: the gate's paired tests read these. Tasks of
EleutherAI's lm-evaluation-harness named in `eval.lm_eval_tasks` add `lm_eval/<task>/<metric>` (with an interval
of +-1.96 of lm-eval's standard error).

    align eval 1 --recipe recipes/tiny.yaml        (make eval N=1)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignment import rewards
from alignment.generation import device, load_policy, sample
from alignment.manifest import write_json_atomic
from alignment.metrics import bootstrap_interval, pass_at_k, wilson_interval, win_rate, wins
from alignment.lm_eval_tasks import task_manager
from alignment.prompts import read_prompts, write_jsonl
from alignment.seeding import model_identity, request_seed
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult

MODELS = ("input", "sft", "dpo")


def answer_and_score(recipe: StageConfig, model, tokenizer, prompts: list[dict], n: int, temperature: float, desc: str,
                     reward_model: str | None, model_id: str):
    """n answers per prompt (greedy when temperature is 0), each scored: a list per prompt of (completion, score)."""
    settings = {"n": n, "temperature": temperature, "max_new_tokens": recipe.eval.max_new_tokens, "seed": recipe.seed}
    seeds = [request_seed({"messages": p["messages"], "model": model_id, **settings}) for p in prompts]
    completions = sample(model, tokenizer, [p["messages"] for p in prompts], num_samples=n, temperature=temperature,
                         top_p=1.0, max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size,
                         seeds=seeds, desc=desc)
    flat = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    scored = rewards.score(recipe.reward, [p for p, _ in flat], [c.text for _, c in flat], reward_model=reward_model)
    it = iter(zip((c for _, c in flat), scored))
    return [[next(it) for _ in range(n)] for _ in prompts]


def lm_eval_metrics(recipe: StageConfig, model_path: Path) -> dict[str, float]:
    """The recipe's lm-evaluation-harness tasks on one model, with the model's own chat template."""
    if not recipe.eval.lm_eval_tasks:
        return {}
    import lm_eval  # heavy, and needed only when a recipe asks for it

    include = str(recipe.eval.lm_eval_include_path) if recipe.eval.lm_eval_include_path else None
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    spread = ",parallelize=True" if torch.cuda.device_count() > 1 else ""  # split by layers over the GPUs, as generate
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_path},dtype={dtype}{spread}", tasks=list(recipe.eval.lm_eval_tasks),
        task_manager=task_manager(include, tuple(recipe.eval.lm_eval_tasks)), apply_chat_template=True,
        batch_size=recipe.eval.batch_size,
        limit=recipe.eval.lm_eval_limit, device=device(), random_seed=recipe.seed)["results"]
    metrics = {}
    for task, res in results.items():
        for key, value in res.items():
            if isinstance(value, float) and "stderr" not in key:
                metrics[f"lm_eval/{task}/{key}"] = value
                stderr = res.get(key.replace(",", "_stderr,", 1))  # "acc,none" -> "acc_stderr,none"
                if isinstance(stderr, float):  # lm-eval writes "N/A" where it has none
                    metrics[f"lm_eval/{task}/{key}_ci"] = [value - 1.96 * stderr, value + 1.96 * stderr]
    return metrics


def evaluate(recipe: StageConfig, model_path: Path, prompts: list[dict], name: str,
             reward_model: str | None) -> tuple[dict, list[dict]]:
    model, tokenizer = load_policy(str(model_path))
    model_id = model_identity(str(model_path))
    greedy = [g[0] for g in answer_and_score(recipe, model, tokenizer, prompts, 1, 0.0, f"eval {name} greedy",
                                             reward_model, model_id)]
    n = len(prompts)
    checked = [s["verified"] for _, s in greedy if s["verified"] is not None]  # prompts some verifier applies to
    verified = bool(checked)
    metrics = {
        "accuracy": sum(checked) / len(checked) if verified else None,
        "accuracy_ci": wilson_interval(sum(checked), len(checked)),
        "mean_reward": sum(s["reward"] for _, s in greedy) / n,
        "mean_reward_ci": bootstrap_interval([s["reward"] for _, s in greedy]),
        "mean_response_tokens": sum(c.num_tokens for c, _ in greedy) / n,
        "hit_token_limit_share": sum(c.finish_reason == "length" for c, _ in greedy) / n,
        "num_prompts": n,
    }
    correct = {}  # prompt_id -> correct sampled answers, for the prompts a verifier applies to
    if verified and recipe.eval.num_samples:
        sampled = answer_and_score(recipe, model, tokenizer, prompts, recipe.eval.num_samples,
                                   recipe.eval.temperature, f"eval {name} pass@k", reward_model, model_id)
        correct = {p["prompt_id"]: sum(s["verified"] is True for _, s in group) for p, group in zip(prompts, sampled)
                   if group[0][1]["verified"] is not None}
        for k in recipe.eval.pass_k:
            per_prompt = [pass_at_k(recipe.eval.num_samples, c, k) for c in correct.values()]
            metrics[f"pass@{k}"] = sum(per_prompt) / len(per_prompt)
            metrics[f"pass@{k}_ci"] = bootstrap_interval(per_prompt)
    metrics.update(lm_eval_metrics(recipe, model_path))
    rows = [{"model": name, "prompt_id": p["prompt_id"], "response": c.text, "finish_reason": c.finish_reason, **s,
             **({"num_correct": correct[p["prompt_id"]], "num_samples": recipe.eval.num_samples}
                if p["prompt_id"] in correct else {})}
            for p, (c, s) in zip(prompts, greedy)]
    return metrics, rows


def run(recipe: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    prompts = read_prompts(inputs["eval_prompts"])
    prompts = prompts[:recipe.eval.num_prompts] if recipe.eval.num_prompts else prompts
    metrics, answers = {}, {}
    # The recipe's reward model, or (`trained`) the one this round trained; the judge is not run here.
    reward_model = str(inputs["reward_model"]) if "reward_model" in inputs else None
    for name in MODELS:
        metrics[name], answers[name] = evaluate(recipe, inputs[name], prompts, name, reward_model)
    base = metrics["input"]
    reward = {name: {r["prompt_id"]: r["reward"] for r in answers[name]} for name in MODELS}
    ids = [p["prompt_id"] for p in prompts]
    for name in MODELS:
        ours, theirs = [reward[name][i] for i in ids], [reward["input"][i] for i in ids]
        metrics[name]["win_rate_vs_input"] = win_rate(ours, theirs)
        metrics[name]["win_rate_vs_input_ci"] = bootstrap_interval(wins(ours, theirs))
        metrics[name]["length_drift_vs_input"] = (metrics[name]["mean_response_tokens"]
                                                  / max(base["mean_response_tokens"], 1e-9) - 1.0)
    write_jsonl(out_dir / "answers.jsonl", [r for name in MODELS for r in answers[name]])
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return StageResult(outputs={"metrics": "metrics.json", "answers": "answers.jsonl"},
                       rows={"prompts": len(prompts), "answers": sum(len(a) for a in answers.values())},
                       stats=metrics)
