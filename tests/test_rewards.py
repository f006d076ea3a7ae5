import shutil

import pytest

from alignment.config import InputError, JudgeConfig, ScoringConfig, VerifierConfig
from alignment.judge import judge_request, parse_verdict
from alignment.rewards import combine, score
from alignment.sandbox import isolation_problem
from alignment.verifiers import answer_matches, check_prompt_fields, verify

EXACT = VerifierConfig(answer_regex=r"-?\d+")


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
def test_exact_answer_match(response, answer, expected):
    assert answer_matches(response, answer, EXACT) == expected


def test_a_capture_group_is_what_is_compared():
    v = VerifierConfig(answer_regex=r"Answer: (\d+)")
    assert answer_matches("Answer: 42. Steps: 1", "42", v) == 1.0


@pytest.mark.parametrize("response,answer,expected", [
    (r"so \boxed{0.50}", "0.5", 1.0),      # numerically equal, textually not
    (r"\boxed{1,000}", "1000", 1.0),       # thousands separators
    (r"\boxed{0.3333334}", "0.3333333", 1.0),   # within 1e-6
    (r"\boxed{0.334}", "0.3333333", 0.0),
    (r"\boxed{x+1}", "2", 0.0),            # not a number: a failure, not an error
])
def test_numeric_answer_match(response, answer, expected):
    v = VerifierConfig(answer_regex=r"\\boxed\{([^}]*)\}", match="numeric", tolerance=1e-6)
    assert answer_matches(response, answer, v) == expected


needs_isolation = pytest.mark.skipif(isolation_problem() is not None and shutil.which("apt-get") is None,
                                     reason=f"no isolation on this machine without apt: {isolation_problem()}")


@needs_isolation
def test_a_verifier_scores_only_the_prompts_it_applies_to():
    math = VerifierConfig(name="math", capability="math")
    code = VerifierConfig(name="code", kind="code", capability="code")
    prompts = [{"capability": "math", "answer": "4"},                     # math only
               {"capability": "code", "tests": "assert f() == 1"},        # code only
               {"capability": "chat"},                                     # neither
               {"capability": "math"}]                                     # math without an answer: not checked
    responses = ["2 + 2 = 4", "```python\ndef f():\n    return 1\n```", "hello", "4"]
    assert verify([math, code], prompts, responses) == {"math": [1.0, None, None, None],
                                                        "code": [None, 1.0, None, None]}


@needs_isolation
def test_a_code_verifier_can_give_partial_credit():
    prompts = [{"tests": "assert f(1) == 2\nassert f(2) == 4\nassert f(3) == 6\n"}]
    responses = ["```python\ndef f(x):\n    return x * x if x < 3 else 0\n```"]  # 1*1=1 wrong, 4 right, 0 wrong
    responses.append("```python\ndef f(x):\n    return 2 * x if x < 3 else 0\n```")  # 2, 4 right; 0 wrong
    cfg = dict(name="code", kind="code")
    fraction = verify([VerifierConfig(**cfg, score="fraction")], prompts * 2, responses)["code"]
    assert [round(s, 3) for s in fraction] == [0.333, 0.667]
    assert verify([VerifierConfig(**cfg)], prompts * 2, responses) == {"code": [0.0, 0.0]}  # all: none passes every test


def test_weighted_sum_adds_every_present_score():
    cfg = ScoringConfig(verifiers=[VerifierConfig(name="math", weight=2.0)],
                       reward_model={"model_name_or_path": "rm", "weight": 0.5})
    out = combine(cfg, {"math": [1.0, 0.0, None], "reward_model": [0.4, 3.0, -1.0]},
                  {"math": 2.0, "reward_model": 0.5})
    assert [o["reward"] for o in out] == [2.0 + 0.2, 0.0 + 1.5, -0.5]
    assert [o["verified"] for o in out] == [True, False, None]
    assert [o["passed"] for o in out] == [True, True, True]  # weighted_sum never gates
    assert out[2]["scores"] == {"reward_model": -1.0}  # an absent score is absent, not 0


def test_gate_then_rank_keeps_verifiers_out_of_the_reward_and_gates_instead():
    cfg = ScoringConfig(verifiers=[VerifierConfig(name="math"), VerifierConfig(name="units")],
                       reward_model={"model_name_or_path": "rm", "weight": 1.0}, combine="gate_then_rank")
    out = combine(cfg, {"math": [1.0, 1.0, None], "units": [1.0, 0.0, None], "reward_model": [0.1, 0.9, 0.5]},
                  {"math": 1.0, "units": 1.0, "reward_model": 1.0})
    assert [o["reward"] for o in out] == [0.1, 0.9, 0.5]
    assert [o["verified"] for o in out] == [True, False, None]  # every applicable check must pass
    assert [o["passed"] for o in out] == [True, False, True]


def test_score_runs_verifiers_and_reports_judge_verdicts_scaled():
    cfg = ScoringConfig(verifiers=[VerifierConfig(name="arith")],
                       judge={"template": "{prompt} {response}", "max_score": 2, "weight": 1.0})
    prompts = [{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}] * 3
    out = score(cfg, prompts, ["2", "3", "2"], judge_verdicts=[2, 1, None])
    assert [o["scores"] for o in out] == [{"arith": 1.0, "judge": 1.0}, {"arith": 0.0, "judge": 0.5}, {"arith": 1.0}]
    assert [o["reward"] for o in out] == [2.0, 0.5, 1.0]


def test_gate_then_rank_needs_a_gate_and_a_ranking():
    with pytest.raises(ValueError, match="gate_then_rank needs verifiers"):
        ScoringConfig(verifiers=[VerifierConfig()], combine="gate_then_rank")


JUDGE = JudgeConfig(template='Rate {"json": true}\nQ: {prompt}\nA: {response}\nEnd with "Score: N".', max_score=3)


def test_judge_request_fills_the_template_and_keeps_other_braces():
    req = judge_request(JUDGE, [{"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering.")
    assert req.messages == [{"role": "user", "content": 'Rate {"json": true}\nQ: Why is the sky blue?\n'
                                                         'A: Rayleigh scattering.\nEnd with "Score: N".'}]
    assert req.n == 1 and req.temperature == 0.0


@pytest.mark.parametrize("reply,expected", [
    ("Reasoning... Score: 2", 2),
    ("score: 1 at first, but on reflection SCORE: 3", 3),  # the last verdict counts
    ("Score: 4", None),                                     # outside the rubric
    ("I cannot rate this.", None),
    ("", None),
])
def test_judge_verdicts(reply, expected):
    assert parse_verdict(JUDGE, reply) == expected


@pytest.mark.parametrize("judge,message", [
    ({"template": "Rate {response}"}, r"lacks the placeholders \['\{prompt\}'\]"),
    ({"template": "{prompt} {response}", "verdict_regex": "Score: \\d+"}, "needs exactly one group"),
    ({"template": "{prompt} {response}", "verdict_regex": "Score: (\\d+"}, "does not compile"),
])
def test_bad_judge_settings_are_rejected(judge, message):
    with pytest.raises(ValueError, match=message):
        JudgeConfig(**judge)


def test_unparseable_code_tests_are_named_before_any_work(tmp_path):
    v = VerifierConfig(name="code", kind="code")
    rows = [{"prompt_id": "ok", "tests": "assert f(1) == 2"}, {"prompt_id": "bad", "tests": "assert f(1 == 2"}]
    with pytest.raises(InputError, match=r"prompts.jsonl: prompt 'bad': tests do not parse as Python \(line 1"):
        check_prompt_fields([v], rows, tmp_path / "prompts.jsonl")


def test_code_tests_without_a_check_are_named_before_any_work():
    v = VerifierConfig(name="code", kind="code")
    rows = [{"prompt_id": "empty", "tests": "import math\nEXPECTED = 3\ndef helper():\n    assert False\n"}]
    with pytest.raises(InputError, match=r"prompt 'empty': tests hold no assert that runs"):
        check_prompt_fields([v], rows, "p.jsonl")
    check_prompt_fields([v], [{"prompt_id": "ok", "tests": "def check(f):\n    assert f() == 1\ncheck(f)\n"}], "p.jsonl")


def test_a_verifier_that_matches_no_prompt_is_named():
    v = VerifierConfig(name="math", capability="math")
    with pytest.raises(InputError, match=r"reward.verifiers\[math\]: no prompt in p.jsonl has capability 'math'"):
        check_prompt_fields([v], [{"prompt_id": "a", "capability": "chat", "answer": "1"}], "p.jsonl")


def test_a_reward_model_that_is_not_a_one_label_classifier_is_rejected_at_validation(tmp_path):
    from transformers import LlamaConfig

    from alignment.preflight import check_reward_model

    small = dict(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    LlamaConfig(architectures=["LlamaForCausalLM"], **small).save_pretrained(tmp_path / "lm")
    LlamaConfig(architectures=["LlamaForSequenceClassification"], num_labels=2, **small).save_pretrained(tmp_path / "two")
    LlamaConfig(architectures=["LlamaForSequenceClassification"], num_labels=1, **small).save_pretrained(tmp_path / "rm")
    key = "reward.reward_model.model_name_or_path"
    with pytest.raises(InputError, match=rf"^{key}: .*lm is \['LlamaForCausalLM'\], not a sequence classifier"):
        check_reward_model(str(tmp_path / "lm"))
    with pytest.raises(InputError, match=rf"^{key}: .*two has 2 labels; a reward model has exactly one"):
        check_reward_model(str(tmp_path / "two"))
    with pytest.raises(InputError, match=rf"^{key}: cannot load a model config from '{tmp_path}/none'"):
        check_reward_model(str(tmp_path / "none"))
    check_reward_model(str(tmp_path / "rm"))
