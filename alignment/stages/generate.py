"""Generate: the teacher writes K candidate responses for each of the round's prompts.

The round's prompts are a seeded draw (seed and round number) from the recipe's training prompt file, so every
round sees fresh prompts where the file allows. Each row carries its key (prompt_id, sample_index) and how it was
made (teacher, backend, sampling settings, seed), so later stages join by key, never by position.

    align stage generate --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

import random
from pathlib import Path

from alignment.config import Recipe
from alignment.generation import load_policy, sample
from alignment.prompts import read_prompts, write_jsonl
from alignment.stages.result import StageResult
from alignment.stats import describe


def draw_round_prompts(rows: list[dict], num_prompts: int, seed: int, round_n: int) -> list[dict]:
    """A seeded draw without replacement; all rows when the file has no more than asked for."""
    if num_prompts >= len(rows):
        return rows
    rng = random.Random(f"{seed}-round-{round_n}")
    return rng.sample(rows, num_prompts)


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    s = recipe.sampling
    prompts = draw_round_prompts(read_prompts(inputs["prompts"]), recipe.prompts.num_prompts, recipe.seed, round_n)
    model, tokenizer = load_policy(str(inputs["teacher"]))
    completions = sample(model, tokenizer, [p["messages"] for p in prompts], num_samples=s.num_samples,
                         temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                         batch_size=recipe.teacher.batch_size, seed=recipe.seed + 1000 * round_n,
                         desc=f"generate K={s.num_samples}")
    settings = s.model_dump()
    rows = [
        {"prompt_id": p["prompt_id"], "sample_index": k, "response": c.text, "num_tokens": c.num_tokens,
         "finish_reason": c.finish_reason, "teacher": str(inputs["teacher"]), "backend": recipe.teacher.backend,
         "sampling": settings, "seed": recipe.seed + 1000 * round_n}
        for p, cs in zip(prompts, completions) for k, c in enumerate(cs)
    ]
    write_jsonl(out_dir / "samples.jsonl", rows)
    hit_limit = sum(r["finish_reason"] == "length" for r in rows)
    return StageResult(
        outputs={"samples": "samples.jsonl"},
        rows={"prompts": len(prompts), "samples": len(rows)},
        stats={"response_tokens": describe([r["num_tokens"] for r in rows]), "hit_token_limit": hit_limit,
               "hit_token_limit_share": hit_limit / max(1, len(rows)),
               "distinct_responses_per_prompt": describe(
                   [len({c.text for c in cs}) for cs in completions])},
    )
