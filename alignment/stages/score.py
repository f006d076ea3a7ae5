"""Score: every candidate gets each configured scorer's value and the combined reward.

Candidates are joined to their prompt (and its reference answer) by prompt_id.

    align stage score --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from pathlib import Path

from alignment import rewards
from alignment.config import InputError, Recipe
from alignment.prompts import read_jsonl, read_prompts, write_jsonl
from alignment.stages.result import StageResult
from alignment.stats import describe


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    prompts = {p["prompt_id"]: p for p in read_prompts(inputs["prompts"], need_answer=recipe.reward.verifier is not None)}
    samples = read_jsonl(inputs["samples"])
    missing = {r["prompt_id"] for r in samples} - prompts.keys()
    if missing:
        raise InputError(f"{inputs['samples']}: {len(missing)} prompt ids not in {inputs['prompts']}, "
                         f"e.g. {sorted(missing)[:3]}")
    conversations = [prompts[r["prompt_id"]]["messages"] + [{"role": "assistant", "content": r["response"]}]
                     for r in samples]
    scored = rewards.score(recipe.reward, conversations, [prompts[r["prompt_id"]].get("answer") for r in samples])
    rows = [{"prompt_id": r["prompt_id"], "sample_index": r["sample_index"], **s} for r, s in zip(samples, scored)]
    write_jsonl(out_dir / "scores.jsonl", rows)
    by_scorer = {name: describe([r["scores"][name] for r in rows]) for name in (rows[0]["scores"] if rows else {})}
    return StageResult(outputs={"scores": "scores.jsonl"}, rows={"samples": len(samples), "scored": len(rows)},
                       stats={"reward": describe([r["reward"] for r in rows]), "scorers": by_scorer})
