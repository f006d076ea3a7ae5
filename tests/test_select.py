"""Rejection sampling, pair policies and filters, each on a hand-worked case."""

import random
from collections import Counter

import pytest
import torch

from alignment.config import InputError, SelectConfig
from alignment.embeddings import greedy_dedup
from alignment.stages.select import (balance_apologies, choose, exact_dedup, filter_sft_rows, join_by_key,
                                     quality_filter)


def cand(i, reward, response=None, finish="stop", passed=True, tokens=5):
    return {"prompt_id": "p", "sample_index": i, "reward": reward, "response": response or f"answer {i}",
            "finish_reason": finish, "passed": passed, "num_tokens": tokens}


def cfg(**kw):
    base = {"sft_min_reward": 1.0, "pair_min_margin": 0.5}
    return SelectConfig.model_validate({**base, **kw})


def pick(candidates, config=None, seed=0):
    drops = Counter()
    best, pair = choose(candidates, config or cfg(), random.Random(seed), drops)
    idx = lambda c: None if c is None else c["sample_index"]  # noqa: E731
    return idx(best), None if pair is None else (idx(pair[0]), idx(pair[1])), drops


def test_best_for_sft_and_best_versus_worst_for_dpo():
    best, pair, drops = pick([cand(0, 0.0), cand(1, 1.0), cand(2, 0.5), cand(3, 1.0)])
    assert best == 1  # ties at 1.0 go to the lower sample index
    assert pair == (1, 0) and drops == Counter()


def test_all_wrong_gives_neither_and_says_why():
    assert pick([cand(0, 0.0), cand(1, 0.0)]) == (None, None, Counter(sft_best_below_min_reward=1,
                                                                      pair_tied_scores=1))


def test_all_right_gives_sft_but_no_pair():
    assert pick([cand(0, 1.0), cand(1, 1.0)]) == (0, None, Counter(pair_tied_scores=1))


def test_a_gap_below_the_margin_is_no_pair():
    assert pick([cand(0, 1.0), cand(1, 0.7)]) == (0, None, Counter(pair_margin_below_min=1))


def test_truncated_samples_never_win():
    assert pick([cand(0, 1.0, finish="length"), cand(1, 0.2), cand(2, 0.9)], cfg(sft_min_reward=0.5)) == (
        2, (2, 1), Counter(sample_hit_token_limit=1))


def test_identical_text_is_no_preference():
    assert pick([cand(0, 1.0, "same"), cand(1, 0.0, " same ")])[1:] == (
        None, Counter(pair_identical_responses=1))


def test_best_vs_random_draws_among_samples_below_the_margin():
    c = [cand(0, 1.0), cand(1, 0.8), cand(2, 0.4), cand(3, 0.0), cand(4, 0.1, "answer 0")]
    policy = cfg(pair_policy="best_vs_random")
    # eligible rejected: 2 (gap 0.6) and 3 (gap 1.0); 1 is within the margin, 4 repeats the best's text
    drawn = {pick(c, policy, seed)[1][1] for seed in range(40)}
    assert drawn == {2, 3}
    assert pick(c, policy, seed=7) == pick(c, policy, seed=7)  # seeded: the same draw every run
    assert pick([cand(0, 1.0), cand(1, 0.9)], policy)[1:] == (None, Counter(pair_no_rejected_below_margin=1))


def test_gate_then_rank_never_picks_a_failing_sample_and_pairs_pass_over_fail():
    # sample 0 has the top reward but failed its verifier; 1 passed with a lower reward
    c = [cand(0, 3.0, passed=False), cand(1, 1.2), cand(2, 1.0)]
    best, pair, drops = pick(c)
    assert best == 1
    assert pair == (1, 0)  # passing over failing pairs even though the failing one has the higher reward
    best, pair, drops = pick([cand(0, 3.0, passed=False), cand(1, 2.0, passed=False)])
    assert (best, pair) == (None, None)
    assert drops == Counter(sft_no_passing_sample=1, pair_no_passing_chosen=1)


@pytest.mark.parametrize("response,tokens,reason", [
    ("Great!!!! Really!", 5, "sample_too_many_exclamations"),   # 5 '!' > 3
    ("Sure \U0001F600\U0001F600\U0001F389\U0001F44D", 5, "sample_too_many_emojis"),   # 4 emojis > 3
    ("Wow! Fine! Ok!", 5, None),                                  # 3 '!' is allowed
    ("short", 1, "sample_too_short"),
    ("long", 50, "sample_too_long"),
])
def test_sample_filters(response, tokens, reason):
    config = cfg(filters={"min_response_tokens": 2, "max_response_tokens": 40})
    best, _, drops = pick([cand(0, 1.0, response, tokens=tokens)], config)
    assert (best is None) == (reason is not None)
    assert drops == (Counter({reason: 1, "prompt_no_usable_sample": 1}) if reason else Counter(pair_single_candidate=1))


def row(pid, reward, text, prompt="q", **scores):
    return {"prompt_id": pid, "reward": reward, "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": text}], "scores": scores}


def test_exact_dedup_keeps_the_first_of_the_same_prompt_and_response():
    rows = [row("a", 2.0, "x  y"), row("b", 1.0, "x y"), row("c", 0.5, "x y", prompt="other")]
    drops = Counter()
    assert [r["prompt_id"] for r in exact_dedup(rows, drops)] == ["a", "c"]  # white space does not count
    assert drops == Counter(sft_exact_duplicate=1)


def test_apologies_are_capped_at_their_share_keeping_the_best():
    # 9 plain rows and 3 apologies, share 0.1: a / (9 + a) <= 0.1 allows a = 1, the highest-reward apology
    rows = [row(f"p{i}", 1.0, "Here it is.") for i in range(9)]
    rows += [row("s1", 0.2, "I'm sorry, I can't."), row("s2", 0.9, "Sorry - no."), row("s3", 0.5, "I apologize.")]
    drops = Counter()
    kept = balance_apologies(rows, 0.1, drops)
    assert len(kept) == 10 and [r["prompt_id"] for r in kept if r["prompt_id"].startswith("s")] == ["s2"]
    assert drops == Counter(sft_apology_over_share=2)


def test_quality_keeps_the_reward_model_top_quartile_or_the_top_judge_verdict():
    samples = [{"scores": {"reward_model": float(v)}} for v in range(1, 10)]  # 1..9: p75 = 7.5
    rows = [row("a", 0, "x", reward_model=8.0), row("b", 0, "y", reward_model=7.0),
            row("c", 0, "z", reward_model=1.0, judge=1.0), row("d", 0, "w", reward_model=2.0, judge=0.5)]
    drops, stats = Counter(), {}
    assert [r["prompt_id"] for r in quality_filter(rows, samples, drops, stats)] == ["a", "c"]
    assert stats["quality_reward_model_p75"] == 7.5 and drops == Counter(sft_below_quality=2)


def test_greedy_semantic_dedup_compares_with_kept_rows_only():
    v = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.95, 0.3122], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    # cosines: v1.v0 = 0.95 (dropped at 0.9); v2.v0 = 0.8 (kept); v3.v0 = 0, v3.v2 = 0.6 (kept)
    assert greedy_dedup(v, 0.9) == [0, 2, 3]
    assert greedy_dedup(v, 0.7) == [0, 3]  # v2 is now too close to v0; v3's cosine to v2 no longer counts


def test_row_filters_run_best_first_and_return_in_prompt_order():
    rows = [row("b", 1.0, "same"), row("a", 0.5, "same"), row("c", 2.0, "other")]
    out = filter_sft_rows(rows, [], cfg().filters, Counter(), {})
    assert [r["prompt_id"] for r in out] == ["b", "c"]  # b beats a on reward; output sorted by prompt id


def test_semantic_dedup_with_the_shipped_embedding_model():
    rows = [row("a", 2.0, "The capital of France is Paris.", prompt="What is the capital of France?"),
            row("b", 1.0, "Paris is the capital of France.", prompt="What's the capital of France?"),
            row("c", 0.5, "Photosynthesis turns light into chemical energy.", prompt="Explain photosynthesis.")]
    drops = Counter()
    out = filter_sft_rows(rows, [], cfg(filters={"semantic_dedup_threshold": 0.9}).filters, drops, {})
    assert [r["prompt_id"] for r in out] == ["a", "c"] and drops["sft_semantic_duplicate"] == 1


def test_join_matches_by_key_not_position():
    samples = [{"prompt_id": "a", "sample_index": 0, "response": "x"},
               {"prompt_id": "a", "sample_index": 1, "response": "y"}]
    scores = [{"prompt_id": "a", "sample_index": 1, "reward": 1.0},
              {"prompt_id": "a", "sample_index": 0, "reward": 0.0}]
    joined = join_by_key(samples, scores)
    assert [(r["response"], r["reward"]) for r in joined] == [("x", 0.0), ("y", 1.0)]


def test_join_refuses_missing_or_duplicate_keys():
    samples = [{"prompt_id": "a", "sample_index": 0}, {"prompt_id": "a", "sample_index": 1}]
    with pytest.raises(InputError, match="disagree on 1 keys"):
        join_by_key(samples, [{"prompt_id": "a", "sample_index": 0, "reward": 1.0}])
    with pytest.raises(InputError, match="duplicate"):
        join_by_key(samples, [{"prompt_id": "a", "sample_index": 0, "reward": 1.0}] * 2)


def test_the_stage_keeps_failed_prompts_aside_and_draws_its_histograms(tmp_path):
    import json

    from alignment.config import load_recipe
    from alignment.stages import select

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    # "hard": every sample wrong; "mixed": one right of three; "easy": all right, two texts
    verdicts = {"hard": [0, 0, 0], "mixed": [0, 1, 0], "easy": [1, 1, 1]}
    prompts = jsonl("prompts.jsonl", [{"prompt_id": p, "messages": [{"role": "user", "content": f"{p}?"}],
                                       "answer": "1"} for p in verdicts])
    samples = jsonl("samples.jsonl", [{"prompt_id": p, "sample_index": i, "response": f"{p} {i % 2}",
                                       "finish_reason": "stop", "num_tokens": 3}
                                      for p, vs in verdicts.items() for i in range(3)])
    scores = jsonl("scores.jsonl", [{"prompt_id": p, "sample_index": i, "scores": {"arithmetic": float(v)},
                                     "verified": bool(v), "passed": True, "reward": float(v)}
                                    for p, vs in verdicts.items() for i, v in enumerate(vs)])
    out = tmp_path / "select"
    out.mkdir()
    result = select.run(load_recipe("recipes/tiny.yaml"), {"prompts": prompts, "samples": samples,
                                                          "scores": scores}, out, 2)
    failed = [json.loads(x) for x in (out / "failed_prompts.jsonl").read_text().splitlines()]
    assert failed == [{"prompt_id": "hard", "messages": [{"role": "user", "content": "hard?"}], "answer": "1",
                       "failed_round": 2}]
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample_index"]) for r in sft] == [("easy", 0), ("mixed", 1)]
    (pair,) = pairs  # the right answer against one of the two equally wrong ones
    assert pair["prompt_id"] == "mixed" and pair["chosen_index"] == 1 and pair["rejected_index"] in (0, 2)
    # hard and easy: the worst-ranked sample (the last of equals) repeats the best one's text, "x 0"
    assert result.stats["dropped"] == {"sft_best_below_min_reward": 1, "pair_identical_responses": 2}
    assert result.stats["acceptance_per_prompt"]["mean"] == pytest.approx((0 + 1 / 3 + 1) / 3)
    for png in result.stats["plots"]:
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summaries_keep_their_quartiles_between_the_min_and_the_max():
    from alignment.distribution import distribution

    # two values 157 and 159: by hand, p25 = 157.5, median 158, p75 = 158.5 (linear between the two)
    assert distribution([157, 159]) == {"count": 2, "min": 157, "p25": 157.5, "median": 158.0, "p75": 158.5, "max": 159,
                                    "mean": 158.0}
