import pytest

from alignment.config import RewardConfig
from alignment.rewards import score, verify_answer

NUM = r"-?\d+"


@pytest.mark.parametrize("response,answer,expected", [
    ("12 + 7 = 19", "19", 1.0),      # the last integer is the answer, not the operands
    ("12 + 7 = 18", "19", 0.0),
    ("12 + 7 = 19", "12", 0.0),      # an operand is not an answer
    ("the answer is -4", "-4", 1.0),
    ("3 - 7 = 4", "-4", 0.0),        # the sign matters
    ("no digits here", "5", 0.0),
    ("", "5", 0.0),
    ("5 = 5 ", " 5", 1.0),           # surrounding white space is not part of the answer
])
def test_numeric_verifier(response, answer, expected):
    assert verify_answer(response, answer, NUM) == expected


def test_verifier_with_a_capture_group_compares_the_group():
    assert verify_answer("Answer: 42. Steps: 1", "42", r"Answer: (\d+)") == 1.0


def test_score_keeps_each_scorer_and_the_weighted_sum():
    cfg = RewardConfig.model_validate({"verifier": {"answer_regex": NUM, "weight": 2.0}})
    convs = [[{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "1 + 1 = 2"}],
             [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "1 + 2 = 4"}]]
    assert score(cfg, convs, ["2", "3"]) == [{"scores": {"verifier": 1.0}, "reward": 2.0},
                                             {"scores": {"verifier": 0.0}, "reward": 0.0}]
