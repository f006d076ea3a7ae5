from collections import Counter

import pytest

from alignment.config import InputError
from alignment.stages.select import choose, join_by_key


def cand(i, reward, response=None, finish="stop"):
    return {"prompt_id": "p", "sample_index": i, "reward": reward, "response": response or f"answer {i}",
            "finish_reason": finish}


def test_best_for_sft_and_best_versus_worst_for_dpo():
    drops = Counter()
    best, pair = choose([cand(0, 0.0), cand(1, 1.0), cand(2, 0.5), cand(3, 1.0)], 1.0, 0.5, drops)
    assert best["sample_index"] == 1  # ties at 1.0 go to the lower sample index
    assert (pair[0]["sample_index"], pair[1]["sample_index"]) == (1, 0)
    assert drops == Counter()


def test_all_wrong_gives_neither_and_says_why():
    drops = Counter()
    best, pair = choose([cand(0, 0.0), cand(1, 0.0)], 1.0, 0.5, drops)
    assert best is None and pair is None
    assert drops == Counter(sft_best_below_min_reward=1, pair_margin_below_min=1)


def test_all_right_gives_sft_but_no_pair():
    drops = Counter()
    best, pair = choose([cand(0, 1.0), cand(1, 1.0)], 1.0, 0.5, drops)
    assert best["sample_index"] == 0 and pair is None
    assert drops == Counter(pair_margin_below_min=1)


def test_truncated_samples_never_win():
    drops = Counter()
    best, pair = choose([cand(0, 1.0, finish="length"), cand(1, 0.2), cand(2, 0.9)], 0.5, 0.5, drops)
    assert best["sample_index"] == 2
    assert (pair[0]["sample_index"], pair[1]["sample_index"]) == (2, 1)
    assert drops == Counter(sample_hit_token_limit=1)


def test_identical_text_is_no_preference():
    drops = Counter()
    _, pair = choose([cand(0, 1.0, "same"), cand(1, 0.0, " same ")], 1.0, 0.5, drops)
    assert pair is None and drops["pair_identical_responses"] == 1


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
