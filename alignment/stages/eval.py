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

from alignment import rewards
from alignment.backends import Serving, make_requests, open_backend, send
from alignment.config import Backend
from alignment.backends.base import Completion
from alignment.judge import pair_requests, pair_wins
from alignment.manifest import write_json_atomic
from alignment.metrics import bootstrap_interval, pass_at_k, wilson_interval, win_rate, wins
from alignment.lm_eval_tasks import lm_eval_metrics
from alignment.pins import pins_file_of
from alignment.prompts import read_prompts, write_jsonl
from alignment.seeding import model_identity
from alignment.shards import load_shards
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult

MODELS = ("input", "sft", "dpo")


def serving(config: StageConfig, teacher: bool = False) -> Serving:
    """How eval serves a model: eval's backend and engine, else the teacher's. The models are checkpoints of this
    run, which existing endpoints cannot load: `openai` means a vLLM server the stage starts for each model, on
    loopback and without a key. The fixed teacher (`teacher`: teacher_eval) is served as generate serves it, on
    the teacher's backend and engine: eval's engine is sized for the round's checkpoints (Llama 3.1 8B: one bf16
    copy per GPU, data parallel 8), where the 405B FP8 teacher needs its own tensor parallel split."""
    t, e = config.teacher, config.eval
    if teacher:
        return Serving.of(t, batch_size=e.batch_size)
    backend = e.backend or t.backend
    return Serving.of(t, backend=backend, engine=e.engine or t.engine, batch_size=e.batch_size,
                      serve=backend == Backend.openai, endpoints=[], api_key_env=None)


def settings(config: StageConfig, n: int, temperature: float) -> dict:
    return {"num_samples": n, "temperature": temperature, "top_p": 1.0, "max_new_tokens": config.eval.max_new_tokens}


def answers(config: StageConfig, path: Path, prompts: list[dict], out_dir: Path,
            served: Serving | None = None) -> tuple[list[Completion], list[list[Completion]] | None, dict]:
    """One model's greedy answer per prompt, its `eval.num_samples` sampled answers per prompt (None when
    pass@k is not measured) and its lm-eval metrics, through one engine (`served`, None: `serving(config)`) that
    is stopped on return. Requests are built and saved as in generate (alignment.backends), so a stage that died
    resumes from its shards."""
    convs, model_id = [p["messages"] for p in prompts], model_identity(str(path))
    greedy_ids, greedy = make_requests(convs, model_id, settings(config, 1, 0.0), config.seed)
    sampled_ids, sampled = [], {}
    if config.eval.num_samples and config.reward.verifiers:  # pass@k counts verified answers
        sampled_ids, sampled = make_requests(convs, model_id, settings(config, config.eval.num_samples,
                                                                        config.eval.temperature), config.seed)
    done, lm_eval = load_shards(out_dir / "shards"), {}
    if config.eval.lm_eval_tasks or any(rid not in done for rid in [*greedy, *sampled]):
        with open_backend(served or serving(config), str(path), out_dir) as backend:
            send(backend, greedy, done, out_dir / "shards")
            send(backend, sampled, done, out_dir / "shards")
            lm_eval = lm_eval_metrics(config, backend, path, pins=pins_file_of(out_dir))
    completions = lambda rid: [Completion(*c) for c in done[rid]["completions"]]  # noqa: E731
    return ([completions(rid)[0] for rid in greedy_ids],
            [completions(rid) for rid in sampled_ids] if sampled else None, lm_eval)


def scored(config: StageConfig, prompts: list[dict], groups: list[list[Completion]], reward_model):
    """Each completion of each prompt's group with its scores: a list per prompt of (completion, score)."""
    flat = [(p, c) for p, cs in zip(prompts, groups) for c in cs]
    it = iter(zip((c for _, c in flat), rewards.score(config.reward, [p for p, _ in flat], [c.text for _, c in flat],
                                                      reward_model=reward_model)))
    return [[next(it) for _ in cs] for cs in groups]


def model_metrics(config: StageConfig, prompts: list[dict], name: str, generated, reward_model
                  ) -> tuple[dict, list[dict]]:
    greedy_answers, sampled_answers, lm_eval = generated
    greedy = [g[0] for g in scored(config, prompts, [[c] for c in greedy_answers], reward_model)]
    n = len(prompts)
    checked = [s["verified"] for _, s in greedy if s["verified"] is not None]  # prompts some verifier applies to
    metrics = {
        "accuracy": sum(checked) / len(checked) if checked else None,
        "accuracy_ci": wilson_interval(sum(checked), len(checked)),
        "mean_reward": sum(s["reward"] for _, s in greedy) / n,
        "mean_reward_ci": bootstrap_interval([s["reward"] for _, s in greedy]),
        "mean_response_tokens": sum(c.num_tokens or 0 for c, _ in greedy) / n,
        "hit_token_limit_share": sum(c.finish_reason == "length" for c, _ in greedy) / n,
        "num_prompts": n,
    }
    capability = [p.get("capability") or "default" for p in prompts]
    if len(set(capability)) > 1:  # a mix (Llama 3 tracked each capability): accuracy per capability as well
        for cap in sorted(set(capability)):
            ok = [s["verified"] for (_, s), c in zip(greedy, capability) if c == cap and s["verified"] is not None]
            if ok:
                metrics[f"accuracy/{cap}"] = sum(ok) / len(ok)
                metrics[f"accuracy/{cap}_ci"] = wilson_interval(sum(ok), len(ok))
    correct = {}  # prompt_id -> correct sampled answers, for the prompts a verifier applies to
    if checked and sampled_answers is not None:
        sampled = scored(config, prompts, sampled_answers, reward_model)
        correct = {p["prompt_id"]: sum(s["verified"] is True for _, s in group) for p, group in zip(prompts, sampled)
                   if group[0][1]["verified"] is not None}
        for k in config.eval.pass_k:
            per_prompt = [pass_at_k(config.eval.num_samples, c, k) for c in correct.values()]
            metrics[f"pass@{k}"] = sum(per_prompt) / len(per_prompt)
            metrics[f"pass@{k}_ci"] = bootstrap_interval(per_prompt)
    metrics.update(lm_eval)
    rows = [{"model": name, "prompt_id": p["prompt_id"], "capability": cap, "response": c.text,
             "finish_reason": c.finish_reason, **s,
             **({"num_correct": correct[p["prompt_id"]], "num_samples": config.eval.num_samples}
                if p["prompt_id"] in correct else {})}
            for p, cap, (c, s) in zip(prompts, capability, greedy)]
    return metrics, rows


def evaluate(config: StageConfig, models: dict[str, Path], prompts: list[dict], out_dir: Path,
             reward_model: str | None, served: Serving | None = None
             ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Metrics and greedy answer rows per model, each served as `served` says (None: `serving(config)`). The
    models are served one after another, each engine stopped before the next starts; then the reward model is
    loaded once and scores every model's answers, always on eval's engine, so that teacher_eval's scores and the
    rounds' come from the reward model loaded the same way."""
    generated = {name: answers(config, path, prompts, out_dir, served) for name, path in models.items()}
    with rewards.open_reward_model(config.reward.reward_model, reward_model, serving(config).engine) as rm:
        results = {name: model_metrics(config, prompts, name, g, rm) for name, g in generated.items()}
    return {n: m for n, (m, _) in results.items()}, {n: r for n, (_, r) in results.items()}


def judge_metrics(config: StageConfig, teacher: Path, prompts: list[dict], answers: dict[str, list[dict]],
                  out_dir: Path) -> dict[str, dict]:
    """Per checkpoint: the teacher's verdicts on its greedy answer against the input model's, in both orders,
    through the teacher's backend (requests saved in the shards like the answers)."""
    cfg, out = config.eval.judge, {}
    conversations = {name: pair_requests(cfg, prompts, [r["response"] for r in answers[name]],
                                         [r["response"] for r in answers["input"]]) for name in MODELS[1:]}
    flat = [c for convs in conversations.values() for c in convs]
    ids, requests = make_requests(flat, model_identity(str(teacher)), {**settings(config, 1, 0.0),
                                  "max_new_tokens": cfg.max_new_tokens}, config.seed)
    done = load_shards(out_dir / "shards")
    if any(rid not in done for rid in requests):
        with open_backend(config.teacher, str(teacher), out_dir) as backend:
            send(backend, requests, done, out_dir / "shards")
    replies = iter(done[rid]["completions"][0][0] for rid in ids)
    for name, convs in conversations.items():
        per_prompt = [pair_wins(cfg, next(replies), next(replies)) for _ in range(len(convs) // 2)]  # ours A, then B
        judged = [w for w in per_prompt if w is not None]
        out[name] = {"judge_win_rate_vs_input": sum(judged) / len(judged) if judged else None,
                     "judge_win_rate_vs_input_ci": bootstrap_interval(judged),
                     "judge_unjudged_prompts": len(per_prompt) - len(judged)}
    return out


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    prompts = read_prompts(inputs["eval_prompts"])[:config.eval.num_prompts]  # None: all
    # The recipe's reward model, or (`trained`) the one this round trained.
    reward_model = str(inputs["reward_model"]) if "reward_model" in inputs else None
    metrics, answers = evaluate(config, {name: inputs[name] for name in MODELS}, prompts, out_dir, reward_model)
    reward = {name: {r["prompt_id"]: r["reward"] for r in answers[name]} for name in MODELS}
    ids = [p["prompt_id"] for p in prompts]
    for name in MODELS:
        ours, theirs = [reward[name][i] for i in ids], [reward["input"][i] for i in ids]
        metrics[name]["win_rate_vs_input"] = win_rate(ours, theirs)
        metrics[name]["win_rate_vs_input_ci"] = bootstrap_interval(wins(ours, theirs))
        metrics[name]["length_drift_vs_input"] = (metrics[name]["mean_response_tokens"]
                                                  / max(metrics["input"]["mean_response_tokens"], 1e-9) - 1.0)
    if config.eval.judge:
        for name, judged in judge_metrics(config, inputs["teacher"], prompts, answers, out_dir).items():
            metrics[name].update(judged)
    write_jsonl(out_dir / "answers.jsonl", [r for name in MODELS for r in answers[name]])
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return StageResult(outputs={"metrics": "metrics.json", "answers": "answers.jsonl"},
                       rows={"prompts": len(prompts), "answers": sum(len(a) for a in answers.values())},
                       stats=metrics)
