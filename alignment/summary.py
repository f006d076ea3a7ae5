"""`align stats <round>`: what scoring and selection did to a round's samples, read from the stages' manifests."""

from __future__ import annotations

from alignment.config import InputError, Recipe
from alignment.manifest import read_manifest
from alignment.round import round_dir, stage_dir


def fmt(d: dict | None) -> str:
    if not d or not d.get("count"):
        return "-"
    return f"n={d['count']} mean={d['mean']:.3f} p25={d['p25']:.3f} median={d['median']:.3f} p75={d['p75']:.3f}"


def round_summary(recipe: Recipe, round_n: int) -> str:
    if not round_dir(recipe, round_n).exists():
        raise InputError(f"round {round_n} does not exist: no folder {round_dir(recipe, round_n)}")
    lines = [f"round {round_n} of {recipe.name}"]
    gen = read_manifest(stage_dir(recipe, round_n, "generate"))
    if gen:
        st = gen["stats"]
        lines.append(f"generate: {gen['rows']['samples']} samples of {gen['rows']['prompts']} prompts; "
                     f"{st['hit_token_limit']} hit the token limit")
    score = read_manifest(stage_dir(recipe, round_n, "score"))
    if score:
        st = score["stats"]
        lines.append(f"score ({st['combine']}): verified {st['verified']}")
        for name, d in st["scorers"].items():
            lines.append(f"  {name:<14} {fmt(d)}")
        lines.append(f"  {'reward':<14} {fmt(st['reward'])}")
        if "judge_unparseable" in st:
            lines.append(f"  judge verdicts {st['judge_verdicts']}, unparseable {st['judge_unparseable']}")
    sel = read_manifest(stage_dir(recipe, round_n, "select"))
    if sel:
        rows, st = sel["rows"], sel["stats"]
        lines.append(f"select: {rows['sft']} SFT rows and {rows['pairs']} pairs ({st['pair_policy']}) from "
                     f"{rows['prompts']} prompts; {rows['failed_prompts']} prompts failed every sample (kept aside)")
        lines.append(f"  acceptance per prompt {fmt(st['acceptance_per_prompt'])}")
        lines.append(f"  pair margin           {fmt(st['pair_margin'])}")
        for reason, n in st["dropped"].items():
            lines.append(f"  dropped {reason:<34} {n}")
        lines.append(f"  plots: {stage_dir(recipe, round_n, 'select') / 'plots'}")
    rm = read_manifest(stage_dir(recipe, round_n, "reward_model"))
    if rm:
        st = rm["stats"]
        acc = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731  (None: no held-out pairs)
        lines.append(f"reward_model: {rm['rows']['train_pairs']} training pairs; held-out pair accuracy "
                     f"{acc(st['held_out_pair_accuracy_before'])} -> {acc(st['held_out_pair_accuracy'])} on "
                     f"{rm['rows']['held_out_pairs']} pairs")
    if len(lines) == 1:
        lines.append("no stage of this round has finished")
    return "\n".join(lines)
