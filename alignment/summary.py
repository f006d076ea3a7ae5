"""`align stats <round>`: what scoring and selection did to a round's samples, read from the stages' manifests."""

from __future__ import annotations

from alignment.config import InputError, Recipe
from alignment.manifest import read_manifest
from alignment.metrics import fmt
from alignment.inputs import round_dir, stage_dir
from alignment.stage_table import round_stages


def dist(d: dict | None) -> str:
    if not d or not d.get("count"):
        return "-"
    return f"n={d['count']} mean={d['mean']:.3f} p25={d['p25']:.3f} median={d['median']:.3f} p75={d['p75']:.3f}"


def score_lines(m: dict) -> list[str]:
    st = m["stats"]
    lines = [f"  combine {st['combine']}; verified {st['verified']}"]
    lines += [f"  {name:<14} {dist(d)}" for name, d in [*st["scorers"].items(), ("reward", st["reward"])]]
    if "judge_unparseable" in st:
        lines.append(f"  judge verdicts {st['judge_verdicts']}, unparseable {st['judge_unparseable']}")
    return lines


def select_lines(m: dict) -> list[str]:
    rows, st = m["rows"], m["stats"]
    return ([f"  {rows['sft']} SFT rows and {rows['pairs']} pairs ({st['pair_policy']}) from {rows['prompts']} "
             f"prompts; {rows['failed_prompts']} prompts failed every sample (kept aside)",
             f"  acceptance per prompt {dist(st['acceptance_per_prompt'])}",
             f"  pair margin           {dist(st['pair_margin'])}"]
            + [f"  dropped {reason:<34} {n}" for reason, n in st["dropped"].items()])


def reward_training_lines(m: dict) -> list[str]:
    st = m["stats"]  # an accuracy is None without held-out pairs: fmt writes "-"
    return [f"  held-out pair accuracy {fmt(st['held_out_pair_accuracy_before'])} -> "
            f"{fmt(st['held_out_pair_accuracy'])} on {m['rows']['held_out_pairs']} pairs"]


DETAILS = {"generate": lambda m: [f"  {m['stats']['hit_token_limit']} samples hit the token limit"],
           "score": score_lines, "select": select_lines, "reward_training": reward_training_lines}


def round_summary(recipe: Recipe, round_n: int) -> str:
    """Every finished stage of the round: its rows in and out, wall time, and the details its statistics hold."""
    if not round_dir(recipe, round_n).exists():
        raise InputError(f"round {round_n} does not exist: no folder {round_dir(recipe, round_n)}")
    lines = [f"round {round_n} of {recipe.name}"]
    for stage in round_stages(recipe, round_n):
        if m := read_manifest(stage_dir(recipe, round_n, stage.name)):
            rows = ", ".join(f"{k} {v}" for k, v in m["rows"].items())
            lines.append(f"{stage.name}: {rows} ({m['wall_time_s']:.0f}s)")
            lines += DETAILS.get(stage.name, lambda m: [])(m)
    if len(lines) == 1:
        lines.append("no stage of this round has finished")
    return "\n".join(lines)
