import json

import pytest

from alignment.config import InputError, load_recipe
from alignment.report import write_report
from alignment.round import promotion


def put(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def model(acc, tokens=10.0, ci=False):
    m = {"accuracy": acc, "mean_reward": acc, "pass@1": acc, "win_rate_vs_input": 0.5, "mean_response_tokens": tokens,
         "length_drift_vs_input": 0.0, "hit_token_limit_share": 0.0}
    return m | ({"accuracy_ci": [acc - 0.05, acc + 0.05], "win_rate_vs_input_ci": [0.4, 0.6]} if ci else {})


EVIDENCE = {"model": "sft", "against": "input", "metric": "accuracy", "difference": 0.45, "ci": [0.35, 0.55],
            "test": "McNemar exact", "p_value": 0.0001}


def fake_round(run, n, accs, acceptance, promoted, with_dpo_log=True, ci=False):
    """A completed round as its stages leave it; with `ci`, the intervals and evidence of the noise-aware gate."""
    d = run / f"round-{n}"
    put(d / "eval/manifest.json", {"stage": "eval"})
    put(d / "eval/metrics.json", {"input": model(accs[0], ci=ci), "sft": model(accs[1], ci=ci),
                                  "dpo": model(accs[2], ci=ci)})
    put(d / "select/manifest.json", {"rows": {"sft": 10 * n, "pairs": 5 * n},
                                     "stats": {"acceptance_per_prompt": {"mean": acceptance}}})
    put(d / "promote/manifest.json", {"stage": "promote"})
    put(d / "promote/decision.json", {"promoted": promoted, "forced": promoted == "sft", "reasons": ["r"],
                                      **({"evidence": EVIDENCE} if ci else {})})
    put(d / "dpo/manifest.json", {"stage": "dpo", "stats": {"log_probs": [
        {"step": 10, "policy_chosen": -5.0, "policy_rejected": -9.0, "ref_chosen": -6.0, "ref_rejected": -7.0}]}})
    if with_dpo_log:
        put(d / "dpo/log_history.json", [{"step": 10, "rewards/margins": 0.1}, {"step": 20, "rewards/margins": 0.3},
                                         {"step": 20, "train_loss": 0.5}])


def test_report_has_a_row_per_round_and_model_and_every_plot(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [f"runs_dir={tmp_path}"])
    run = tmp_path / "tiny"
    fake_round(run, 1, (0.1, 0.3, 0.35), 0.2, "dpo")
    fake_round(run, 2, (0.35, 0.8, 0.85), 0.6, "sft", ci=True)  # round 1 predates intervals: both must plot
    (run / "round-3").mkdir()  # a round without a completed eval is left out
    report = write_report(recipe).read_text()
    assert "| 1 | input | 0.100 | 0.100 | 0.100 | 0.500 | 10.000 | 0.000 | 0.000 |" in report
    # 0.85 -+ 0.05 and the win rate's [0.4, 0.6], at two decimals, in their metrics' cells
    assert "| 2 | dpo | 0.850 [0.80, 0.90] | 0.850 | 0.850 | 0.500 [0.40, 0.60] | 10.000 | 0.000 | 0.000 |" in report
    assert "| 1 | 10 | 5 | 0.200 | dpo | r |" in report
    assert ("| 2 | 20 | 10 | 0.600 | sft (forced): accuracy +0.450 [+0.350, +0.550] vs input, McNemar exact "
            "p=0.0001 | r |") in report
    assert "| 3 |" not in report
    for png in ("accuracy", "reward", "win_rate", "length", "acceptance", "dpo_margins", "dpo_log_probs"):
        assert (run / "report" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{png}]({png}.png)" in report


def test_report_without_any_evaluated_round_is_a_clear_error(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [f"runs_dir={tmp_path}"])
    with pytest.raises(InputError, match="no round of .* has a completed eval; run `make round N=1` first"):
        write_report(recipe)


def test_the_promotion_line_shows_the_promoted_metric_with_its_interval_and_the_gates_evidence():
    metrics = {"sft": model(0.8, ci=True)}
    decision = {"promoted": "sft", "forced": False, "primary_metric": "accuracy", "evidence": EVIDENCE}
    assert promotion(decision, metrics) == ("promoted: sft, accuracy 0.800 [0.75, 0.85]; accuracy +0.450 "
                                            "[+0.350, +0.550] vs input, McNemar exact p=0.0001")
    # a decision written before the gate kept evidence, and the input carrying on, still read plainly
    assert promotion({"promoted": "sft", "forced": True}, {"sft": model(0.8)}) == "promoted: sft (forced), accuracy 0.800"
