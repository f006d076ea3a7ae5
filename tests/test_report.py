import json

import pytest

from alignment.config import InputError, load_recipe
from alignment.report import write_report


def put(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def model(acc, tokens=10.0):
    return {"accuracy": acc, "mean_reward": acc, "pass@1": acc, "win_rate_vs_input": 0.5, "mean_response_tokens": tokens,
            "length_drift_vs_input": 0.0, "hit_token_limit_share": 0.0}


def fake_round(run, n, accs, acceptance, promoted, with_dpo_log=True):
    d = run / f"round-{n}"
    put(d / "eval/manifest.json", {"stage": "eval"})
    put(d / "eval/metrics.json", {"input": model(accs[0]), "sft": model(accs[1]), "dpo": model(accs[2])})
    put(d / "select/manifest.json", {"rows": {"sft": 10 * n, "pairs": 5 * n},
                                     "stats": {"acceptance_per_prompt": {"mean": acceptance}}})
    put(d / "promote/manifest.json", {"stage": "promote"})
    put(d / "promote/decision.json", {"promoted": promoted, "forced": promoted == "sft", "reasons": ["r"]})
    put(d / "dpo/manifest.json", {"stage": "dpo", "stats": {"log_probs": [
        {"step": 10, "policy_chosen": -5.0, "policy_rejected": -9.0, "ref_chosen": -6.0, "ref_rejected": -7.0}]}})
    if with_dpo_log:
        put(d / "dpo/log_history.json", [{"step": 10, "rewards/margins": 0.1}, {"step": 20, "rewards/margins": 0.3},
                                         {"step": 20, "train_loss": 0.5}])


def test_report_has_a_row_per_round_and_model_and_every_plot(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [f"runs_dir={tmp_path}"])
    run = tmp_path / "tiny"
    fake_round(run, 1, (0.1, 0.3, 0.35), 0.2, "dpo")
    fake_round(run, 2, (0.35, 0.8, 0.85), 0.6, "sft")
    (run / "round-3").mkdir()  # a round without a completed eval is left out
    report = write_report(recipe).read_text()
    assert "| 1 | input | 0.100 | 0.100 | 0.100 | 0.500 | 10.000 | 0.000 | 0.000 |" in report
    assert "| 2 | dpo | 0.850 | 0.850 | 0.850 | 0.500 | 10.000 | 0.000 | 0.000 |" in report
    assert "| 1 | 10 | 5 | 0.200 | dpo | r |" in report and "| 2 | 20 | 10 | 0.600 | sft (forced) | r |" in report
    assert "| 3 |" not in report
    for png in ("accuracy", "reward", "win_rate", "length", "acceptance", "dpo_margins", "dpo_log_probs"):
        assert (run / "report" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{png}]({png}.png)" in report


def test_report_without_any_evaluated_round_is_a_clear_error(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [f"runs_dir={tmp_path}"])
    with pytest.raises(InputError, match="no round of .* has a completed eval; run `make round N=1` first"):
        write_report(recipe)
