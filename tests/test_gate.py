import pytest

from alignment.config import GateConfig, InputError
from alignment.stages.promote import decide


def metrics(input_acc, sft_acc, dpo_acc, input_reward=0.5, sft_reward=0.5, dpo_reward=0.5):
    return {"input": {"accuracy": input_acc, "mean_reward": input_reward},
            "sft": {"accuracy": sft_acc, "mean_reward": sft_reward},
            "dpo": {"accuracy": dpo_acc, "mean_reward": dpo_reward}}


def test_dpo_preferred_when_it_does_not_regress():
    assert decide(GateConfig(), metrics(0.30, 0.40, 0.35))["promoted"] == "dpo"


def test_falls_back_to_sft_when_dpo_regresses():
    d = decide(GateConfig(), metrics(0.30, 0.40, 0.25))
    assert d["promoted"] == "sft"
    assert [c["passed"] for c in d["checks"]] == [False, True]  # dpo checked first, then sft
    assert "dpo accuracy 0.2500 vs input 0.3000 (tolerance 0.0): REGRESSION" in d["reasons"]


def test_nothing_promoted_when_both_regress_so_the_input_model_carries_on():
    d = decide(GateConfig(), metrics(0.30, 0.29, 0.25))
    assert d["promoted"] == "input" and d["reasons"][-1].startswith("no candidate passed")


def test_tolerance_allows_a_small_drop_and_every_gated_metric_must_pass():
    gate = GateConfig(tolerances={"accuracy": 0.02, "mean_reward": 0.0})
    assert decide(gate, metrics(0.30, 0.0, 0.285))["promoted"] == "dpo"          # 0.015 below, within 0.02
    assert decide(gate, metrics(0.30, 0.0, 0.275))["promoted"] == "input"        # 0.025 below
    assert decide(gate, metrics(0.30, 0.31, 0.35, dpo_reward=0.4))["promoted"] == "sft"  # dpo's reward fell


def test_force_overrides_and_records_what_the_gate_would_have_done():
    d = decide(GateConfig(force="dpo"), metrics(0.30, 0.29, 0.25))
    assert (d["promoted"], d["forced"], d["gate_would_promote"]) == ("dpo", True, "input")


def test_gating_on_a_metric_the_eval_did_not_report_is_a_clear_error():
    with pytest.raises(InputError, match=r"gate.tolerances.pass@4: the eval did not report"):
        decide(GateConfig(tolerances={"pass@4": 0.0}), metrics(0.3, 0.3, 0.3))


def test_unknown_gate_metric_is_rejected_by_the_schema():
    with pytest.raises(ValueError, match="unknown metrics"):
        GateConfig(tolerances={"acuracy": 0.0})
