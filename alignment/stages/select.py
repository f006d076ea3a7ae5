"""Select: rejection sampling and the data filters of Llama 3.

Per prompt, candidates are ranked by (passed the verifiers, reward). The best becomes an SFT example; the best and
a worse one (the worst, or a seeded random one) become a DPO pair. Filters, each switchable in the recipe and
counted under its name in the statistics:

- per sample, before ranking: hit the token limit, response length limits, rule-based cleaning (too many emojis
  or exclamation marks);
- per SFT row, after ranking: exact dedup, quality (reward-model top quartile OR top judge verdict), semantic dedup
  (all-MiniLM-L6-v2, greedy, best first), and balancing of responses that open with an apology.

Prompts where every sample failed its verifiers are written to `failed_prompts.jsonl`, kept aside for later rounds
(`prompts.retry_failed` puts them back into the next round's draw). Samples and scores are joined by
(prompt_id, sample_index); a key present in one file and not the other is an error, not a silent drop.

    align stage select --recipe recipes/tiny.yaml --round 1
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from alignment.config import FiltersConfig, InputError, SelectConfig
from alignment.prompts import read_jsonl, read_prompts, write_jsonl
from alignment.stage_table import StageConfig
from alignment.stages.result import StageResult
from alignment.distribution import distribution

EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F]")
APOLOGY = re.compile(r"^\W*(i'?m sorry|i am sorry|i apologi[sz]e|sorry|my apologies|apologies)\b", re.IGNORECASE)


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


def passes(c: dict) -> bool:
    """The gate of gate_then_rank (score's `passed`): False when a verifier applied and failed. Under
    weighted_sum every sample passes; the verifier is inside the reward."""
    return c.get("passed", True)


def rank(candidates: list[dict]) -> list[dict]:
    """Passing samples first, then by reward; ties go to the lower sample_index, so the choice does not depend on
    file order."""
    return sorted(candidates, key=lambda r: (not passes(r), -r["reward"], r["sample_index"]))


def sample_drop_reason(c: dict, f: FiltersConfig) -> str | None:
    """Why a single sample may not take part in selection, or None."""
    if c["finish_reason"] == "length":
        return "sample_hit_token_limit"
    n = c.get("num_tokens")
    if f.min_response_tokens is not None and n is not None and n < f.min_response_tokens:
        return "sample_too_short"
    if f.max_response_tokens is not None and n is not None and n > f.max_response_tokens:
        return "sample_too_long"
    if f.cleaning is not None:
        if f.cleaning.max_emojis is not None and len(EMOJI.findall(c["response"])) > f.cleaning.max_emojis:
            return "sample_too_many_emojis"
        if f.cleaning.max_exclamations is not None and c["response"].count("!") > f.cleaning.max_exclamations:
            return "sample_too_many_exclamations"
    return None


def pair_for(best: dict, ranked: list[dict], cfg: SelectConfig, rng: random.Random, drops: Counter):
    """(chosen, rejected) or None, counting why. A rejected response must rank below the best by the margin
    (or fail a verifier the best passes) and differ from it."""
    if not passes(best):
        drops["pair_no_passing_chosen"] += 1
        return None
    if len(ranked) < 2:
        drops["pair_single_candidate"] += 1
        return None

    def eligible(c):  # the best passes here: a failing sample is always a fair rejected response
        return not passes(c) or best["reward"] - c["reward"] >= cfg.pair_min_margin

    def same(c):  # the same words ending a tool-call step and ending the turn are different answers
        return assistant_message(c)["content"].strip() == assistant_message(best)["content"].strip() and \
            c.get("stop_reason") == best.get("stop_reason")

    if cfg.pair_policy == "best_vs_worst":
        worst = ranked[-1]
        if same(worst):
            drops["pair_identical_responses"] += 1
        elif worst["reward"] == best["reward"] and passes(worst) == passes(best):
            drops["pair_tied_scores"] += 1
        elif not eligible(worst):
            drops["pair_margin_below_min"] += 1
        else:
            return best, worst
        return None
    pool = [c for c in ranked[1:] if eligible(c) and not same(c)]
    if not pool:
        drops["pair_no_rejected_below_margin"] += 1
        return None
    return best, rng.choice(pool)


def choose(candidates: list[dict], cfg: SelectConfig, rng: random.Random, drops: Counter):
    """One prompt's (SFT sample or None, (chosen, rejected) or None), counting every sample and decision dropped."""
    why = [sample_drop_reason(c, cfg.filters) for c in candidates]
    drops.update(w for w in why if w)
    kept = [c for c, w in zip(candidates, why) if w is None]
    if not kept:
        drops["prompt_no_usable_sample"] += 1
        return None, None
    ranked = rank(kept)
    best, sft = ranked[0], None
    if not passes(best):
        drops["sft_no_passing_sample"] += 1
    elif best["reward"] < cfg.sft_min_reward:
        drops["sft_best_below_min_reward"] += 1
    else:
        sft = best
    return sft, pair_for(best, ranked, cfg, rng, drops)


def assistant_message(sample: dict) -> dict:
    """A sample as the assistant's message, with its stop_reason where it ended a tool-call step (<|eom_id|>), so
    the template renders it back with the ending the model wrote, not as a finished turn."""
    return {"role": "assistant", "content": sample["response"],
            **({"stop_reason": sample["stop_reason"]} if sample.get("stop_reason") else {})}


def ends_a_step(messages: list[dict]) -> bool:
    return any(m.get("stop_reason") for m in messages)


def sft_row(pid: str, prompt: list[dict], best: dict, revise) -> dict:
    """The prompt's SFT row. A revision (execution feedback) trains its corrected answer: after the prompt alone
    (`revise.sft_format: final`), or after the repair dialog that led to it, failed attempts and feedback in the
    prompt so that only the final answer is trained on (`dialog`)."""
    row = {"prompt_id": pid, "sample_index": best["sample_index"], "prompt": prompt,
           "completion": [assistant_message(best)], "reward": best["reward"],
           "scores": best["scores"]}
    if "revision" in best:
        row["revision_turn"] = best["revision"]["turn"]
        if revise.sft_format == "dialog":
            row["prompt"] = prompt + best["revision"]["dialog"]
    return row


def revised_pair(pair: tuple[dict, dict], candidates: list[dict], cfg: SelectConfig, revise, drops: Counter
                 ) -> tuple[dict, dict]:
    """A chosen revision's rejected side is its own failing first attempt under `revise.rejected: first_attempt`
    (the pair then differs by exactly the repair), unless the sample filters dropped that attempt (cut at the token
    limit, say): then the pair as the pair policy chose it, counted."""
    chosen, rejected = pair
    if "revision" in chosen and revise.rejected == "first_attempt":
        first = next(c for c in candidates if c["sample_index"] == chosen["revision"]["of"])
        if sample_drop_reason(first, cfg.filters) is None:
            rejected = first
        else:
            drops["pair_first_attempt_filtered"] += 1
    return chosen, rejected


def filter_sft_rows(rows: list[dict], all_samples: list[dict], f: FiltersConfig, drops: Counter,
                    stats: dict) -> list[dict]:
    """The row-level filters, on rows best first so each keeps the better of two near-copies; prompt_id order out."""
    rows = sorted(rows, key=lambda r: (-r["reward"], r["prompt_id"]))
    if f.exact_dedup:
        rows = exact_dedup(rows, drops)
    if f.quality:
        rows = quality_filter(rows, all_samples, drops, stats)
    if f.semantic_dedup_threshold is not None:
        rows = semantic_dedup(rows, f.semantic_dedup_threshold, drops)
    if f.cleaning is not None and f.cleaning.max_apology_share is not None:
        rows = balance_apologies(rows, f.cleaning.max_apology_share, drops)
    return sorted(rows, key=lambda r: r["prompt_id"])


def balance_apologies(rows: list[dict], max_share: float, drops: Counter) -> list[dict]:
    """Keep at most `max_share` of rows opening with an apology (Llama 3 balanced overused phrases): the
    highest-reward ones are kept, the rest dropped. With n other rows, a apologies keep a / (n + a) <= max_share."""
    sorry = [r for r in rows if APOLOGY.match(r["completion"][0]["content"])]
    if max_share >= 1.0 or not sorry:
        return rows
    others = len(rows) - len(sorry)
    allowed = int(max_share * others / (1.0 - max_share) + 1e-9)
    keep = {id(r) for r in sorted(sorry, key=lambda r: (-r["reward"], r["prompt_id"]))[:allowed]}
    drops["sft_apology_over_share"] += len(sorry) - len(keep)
    return [r for r in rows if r not in sorry or id(r) in keep]


def exact_dedup(rows: list[dict], drops: Counter) -> list[dict]:
    """Rows in reward order; a row whose prompt and (white-space normalised) response repeat a kept row's goes."""
    first: dict = {}  # key -> the first row with it; a dict keeps their order
    for r in rows:
        first.setdefault((json.dumps(r["prompt"], sort_keys=True), " ".join(r["completion"][0]["content"].split())), r)
    drops["sft_exact_duplicate"] += len(rows) - len(first)
    return list(first.values())


def quality_filter(rows: list[dict], all_rows: list[dict], drops: Counter, stats: dict) -> list[dict]:
    """Llama 3's quality filter: keep a row whose reward-model score is in the top quartile of the round's samples
    OR whose judge verdict is the rubric's top score."""
    rm = sorted(r["scores"]["reward_model"] for r in all_rows if "reward_model" in r["scores"])
    if not rm and not any("judge" in r["scores"] for r in all_rows):
        stats["quality_filter"] = "skipped: no reward-model or judge scores this round"
        return rows
    # the top quartile's cut as Python's default (exclusive) quantiles place it; None without reward-model scores
    stats["quality_reward_model_p75"] = cut = statistics.quantiles(rm, n=4)[2] if len(rm) > 1 else (rm or [None])[0]
    kept = [r for r in rows if (cut is not None and r["scores"].get("reward_model", float("-inf")) >= cut)
            or r["scores"].get("judge") == 1.0]
    drops["sft_below_quality"] += len(rows) - len(kept)
    return kept


def semantic_dedup(rows: list[dict], threshold: float, drops: Counter) -> list[dict]:
    from alignment.embeddings import embed, greedy_dedup

    if not rows:
        return rows
    texts = ["\n".join(m["content"] for m in r["prompt"] + r["completion"]) for r in rows]
    kept = greedy_dedup(embed(texts), threshold)
    drops["sft_semantic_duplicate"] += len(rows) - len(kept)
    return [rows[i] for i in kept]


def plot(out: Path, pairs: list[dict], acceptance: list[float]) -> list[str]:
    """Histograms of reward and length, chosen vs rejected, and of acceptance per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        return name

    out.mkdir(exist_ok=True)
    files = []
    for key, label in (("reward", "reward"), ("num_tokens", "response tokens")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for side in ("chosen", "rejected"):
            if vals := [p[f"{side}_{key}"] for p in pairs if p.get(f"{side}_{key}") is not None]:
                ax.hist(vals, bins=30, alpha=0.6, label=f"{side} ({len(vals)})")
        ax.set_xlabel(label), ax.set_ylabel("pairs"), ax.legend(loc="best")
        files.append(save(fig, f"{key}_chosen_vs_rejected.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(acceptance, bins=20, range=(0, 1))
    ax.set_xlabel("share of a prompt's samples that pass and reach sft_min_reward"), ax.set_ylabel("prompts")
    return files + [save(fig, "acceptance_per_prompt.png")]


def run(config: StageConfig, inputs: dict[str, Path], out_dir: Path, round_n: int) -> StageResult:
    cfg = config.select
    rows = join_by_key(read_jsonl(inputs["samples"]), read_jsonl(inputs["scores"]))
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["prompt_id"]].append(r)
    prompts = read_prompts(inputs["prompts"]).by_id(groups)

    drops, stats = Counter(), {}
    sft_rows, pair_rows, failed, acceptance = [], [], [], []
    for pid in sorted(groups):
        candidates = groups[pid]
        acceptance.append(sum(passes(c) and c["reward"] >= cfg.sft_min_reward for c in candidates) / len(candidates))
        if all(c.get("verified") is False for c in candidates):
            failed.append({**prompts[pid], "failed_round": round_n})
        best, pair = choose(candidates, cfg, random.Random(f"{config.seed}-{round_n}-{pid}"), drops)
        prompt = prompts[pid]["messages"]
        if best is not None:  # (a capability goes with the row: sft.balance counts by it)
            sft_rows.append(sft_row(pid, prompt, best, config.revise)
                            | ({"capability": prompts[pid]["capability"]} if "capability" in prompts[pid] else {}))
        if pair is not None:
            chosen, rejected = revised_pair(pair, candidates, cfg, config.revise, drops)
            pair_rows.append({"prompt_id": pid, "chosen_index": chosen["sample_index"],
                              "rejected_index": rejected["sample_index"], "prompt": prompt,
                              "chosen": [assistant_message(chosen)], "rejected": [assistant_message(rejected)],
                              "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
                              "chosen_num_tokens": chosen.get("num_tokens"),
                              "rejected_num_tokens": rejected.get("num_tokens"),
                              **({"revision_turn": chosen["revision"]["turn"]} if "revision" in chosen else {})})
    selected = len(sft_rows)
    sft_rows = filter_sft_rows(sft_rows, rows, cfg.filters, drops, stats)
    if config.revise is not None:
        stats["from_revisions"] = {"sft_rows": sum("revision_turn" in r for r in sft_rows),
                                   "pairs_with_a_revised_chosen": sum("revision_turn" in r for r in pair_rows)}

    write_jsonl(out_dir / "sft.jsonl", sft_rows)
    write_jsonl(out_dir / "pairs.jsonl", pair_rows)
    write_jsonl(out_dir / "failed_prompts.jsonl", failed)
    plots = plot(out_dir / "plots", pair_rows, acceptance)
    return StageResult(
        outputs={"sft": "sft.jsonl", "pairs": "pairs.jsonl", "failed_prompts": "failed_prompts.jsonl",
                 "plots": "plots"},
        rows={"samples": len(rows), "prompts": len(groups), "sft": len(sft_rows), "pairs": len(pair_rows),
              "failed_prompts": len(failed)},
        stats={"dropped": dict(sorted((k, v) for k, v in drops.items() if v)),
               "sft_before_row_filters": selected, "pair_policy": cfg.pair_policy, **stats,
               "tool_call_steps": {"sft": sum(ends_a_step(r["completion"]) for r in sft_rows),
                                   "pairs": sum(ends_a_step(r["chosen"] + r["rejected"]) for r in pair_rows)},
               "acceptance_per_prompt": distribution(acceptance),
               "sft_reward": distribution([r["reward"] for r in sft_rows]),
               "pair_margin": distribution([r["chosen_reward"] - r["rejected_reward"] for r in pair_rows]),
               "plots": plots},
    )

