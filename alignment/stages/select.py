"""Select: rejection sampling. The best candidate of each prompt becomes an SFT example; best versus worst
becomes a DPO pair. Every dropped row is counted under its reason.

Samples and scores are joined by (prompt_id, sample_index); a key present in one file and not the other is an
error, not a silent drop.

    align stage select --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from alignment.config import InputError, Recipe
from alignment.prompts import read_jsonl, read_prompts, write_jsonl
from alignment.stages.result import StageResult
from alignment.stats import describe


def join_by_key(samples: list[dict], scores: list[dict]) -> list[dict]:
    """Each sample with its scores merged in; both sides must hold exactly the same keys."""
    key = lambda r: (r["prompt_id"], r["sample_index"])  # noqa: E731
    by_key = {key(r): r for r in scores}
    if len(by_key) != len(scores):
        raise InputError("scores have duplicate (prompt_id, sample_index) keys")
    sample_keys = [key(r) for r in samples]
    if len(set(sample_keys)) != len(samples):
        raise InputError("samples have duplicate (prompt_id, sample_index) keys")
    if set(sample_keys) != by_key.keys():
        only = set(sample_keys) ^ by_key.keys()
        raise InputError(f"samples and scores disagree on {len(only)} keys, e.g. {sorted(only)[:3]}")
    return [{**r, **by_key[key(r)]} for r in samples]


def rank(candidates: list[dict]) -> list[dict]:
    """Highest reward first; ties go to the lower sample_index, so the choice does not depend on file order."""
    return sorted(candidates, key=lambda r: (-r["reward"], r["sample_index"]))


def choose(candidates: list[dict], sft_min_reward: float, pair_min_margin: float, drops: Counter):
    """(best or None, (chosen, rejected) or None) for one prompt's candidates; counts each drop in `drops`."""
    complete = [c for c in candidates if c["finish_reason"] != "length"]
    drops["sample_hit_token_limit"] += len(candidates) - len(complete)
    if not complete:
        drops["prompt_no_complete_sample"] += 1
        return None, None
    ranked = rank(complete)
    best, worst = ranked[0], ranked[-1]
    sft = best if best["reward"] >= sft_min_reward else None
    if sft is None:
        drops["sft_best_below_min_reward"] += 1
    pair = None
    if len(ranked) < 2:
        drops["pair_single_candidate"] += 1
    elif best["response"].strip() == worst["response"].strip():
        drops["pair_identical_responses"] += 1
    elif best["reward"] - worst["reward"] < pair_min_margin:
        drops["pair_margin_below_min"] += 1
    else:
        pair = (best, worst)
    return sft, pair


def run(recipe: Recipe, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    prompts = {p["prompt_id"]: p for p in read_prompts(inputs["prompts"])}
    rows = join_by_key(read_jsonl(inputs["samples"]), read_jsonl(inputs["scores"]))
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["prompt_id"]].append(r)

    drops: Counter = Counter()
    sft_rows, pair_rows, accepted_share = [], [], []
    for pid, candidates in groups.items():
        accepted_share.append(sum(c["reward"] >= recipe.select.sft_min_reward for c in candidates) / len(candidates))
        best, pair = choose(candidates, recipe.select.sft_min_reward, recipe.select.pair_min_margin, drops)
        prompt = prompts[pid]["messages"]
        if best is not None:
            sft_rows.append({"prompt_id": pid, "sample_index": best["sample_index"], "prompt": prompt,
                             "completion": [{"role": "assistant", "content": best["response"]}],
                             "reward": best["reward"]})
        if pair is not None:
            chosen, rejected = pair
            pair_rows.append({"prompt_id": pid, "chosen_index": chosen["sample_index"],
                              "rejected_index": rejected["sample_index"], "prompt": prompt,
                              "chosen": [{"role": "assistant", "content": chosen["response"]}],
                              "rejected": [{"role": "assistant", "content": rejected["response"]}],
                              "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"]})
    write_jsonl(out_dir / "sft.jsonl", sft_rows)
    write_jsonl(out_dir / "pairs.jsonl", pair_rows)
    return StageResult(
        outputs={"sft": "sft.jsonl", "pairs": "pairs.jsonl"},
        rows={"samples": len(rows), "prompts": len(groups), "sft": len(sft_rows), "pairs": len(pair_rows)},
        stats={"dropped": dict(sorted(drops.items())),
               "acceptance_per_prompt": describe(accepted_share),
               "sft_reward": describe([r["reward"] for r in sft_rows]),
               "pair_margin": describe([r["chosen_reward"] - r["rejected_reward"] for r in pair_rows])},
    )
