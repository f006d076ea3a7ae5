"""Score: every candidate gets each configured scorer's value, whether it passed its verifiers, and the combined
reward (alignment.rewards).

Candidates are joined to their prompt (reference answer, unit tests, capability) by prompt_id. The reward model is
a fixed checkpoint or the one the previous round trained; the judge is the teacher, through the generate stage's
backend.

    align stage score --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from alignment import rewards, verifiers
from alignment.config import InputError
from alignment.prompts import read_jsonl, read_prompts, write_jsonl
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.distribution import distribution


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    cfg = config.reward
    samples = read_jsonl(inputs["samples"])
    prompts = read_prompts(inputs["prompts"]).by_id(r["prompt_id"] for r in samples)
    missing = {r["prompt_id"] for r in samples} - prompts.keys()
    if missing:
        raise InputError(f"{inputs['samples']}: {len(missing)} prompt ids not in {inputs['prompts']}, "
                         f"e.g. {sorted(missing)[:3]}")
    rows_prompts = [prompts[r["prompt_id"]] for r in samples]
    responses = [r["response"] for r in samples]
    verdicts = None
    if cfg.judge is not None:
        from alignment.judge import judge

        verdicts = judge(cfg.judge, config.teacher, str(inputs["teacher"]),
                         [(p["messages"], r) for p, r in zip(rows_prompts, responses)], out_dir)
    rm = str(inputs["reward_model"]) if "reward_model" in inputs else None
    with rewards.open_reward_model(cfg.reward_model, rm, config.teacher.engine) as reward_model:
        checks: dict[str, dict] = {}
        scored = rewards.score(cfg, rows_prompts, responses, reward_model=reward_model, judge_verdicts=verdicts,
                               checks=checks)
    rows = [{"prompt_id": r["prompt_id"], "sample_index": r["sample_index"], **s} for r, s in zip(samples, scored)]
    write_jsonl(out_dir / "scores.jsonl", rows)

    names = sorted({name for r in rows for name in r["scores"]})
    verified = Counter({True: "passed", False: "failed", None: "no_verifier"}[r["verified"]] for r in rows)
    stats = {"reward": distribution([r["reward"] for r in rows]),
             "scorers": {n: distribution([r["scores"][n] for r in rows if n in r["scores"]]) for n in names},
             "verified": dict(verified), "combine": cfg.combine,
             "code_isolation": verifiers.isolation_stats(cfg.verifiers),
             "code_checks": checks,  # per code verifier: checks decided outside / inside the candidate's process
             "reward_model": rm or ("none yet: round 1 has no trained reward model"
                                    if cfg.reward_model is not None else None)}
    if verdicts is not None:
        stats["judge_unparseable"] = sum(v is None for v in verdicts)
        stats["judge_verdicts"] = dict(Counter(str(v) for v in verdicts if v is not None))
    return StageResult(outputs={"scores": "scores.jsonl"}, rows={"samples": len(samples), "scored": len(rows)},
                       stats=stats)
