"""`teacher.source: best`: each round samples from the best model so far by held-out accuracy, the fixed teacher
(evaluated once, as the rounds' models are) or a student a round promoted."""

import json
from pathlib import Path

import pytest

from alignment.config import InputError, load_recipe
from alignment.stage_table import Model, Upstream, round_stages, teacher
from alignment.stages.promote import best_so_far

TINY = "recipes/tiny.yaml"


def test_round_one_samples_from_the_fixed_teacher_and_later_rounds_from_the_best_so_far():
    recipe = load_recipe(TINY, ["teacher.source=best"])
    assert teacher(recipe, 1) == Upstream("bootstrap", "teacher", 0, "the bootstrapped teacher")
    assert (teacher(recipe, 3).stage, teacher(recipe, 3).output, teacher(recipe, 3).round) == ("promote", "best", 2)
    named = load_recipe(TINY, ["teacher={source: best, model_name_or_path: org/teacher}"])
    assert teacher(named, 1) == Model("org/teacher", "teacher.model_name_or_path")
    assert [s.name for s in round_stages(named, 2)][:2] == ["teacher_eval", "generate"]  # no bootstrap needed


def test_the_fixed_teacher_is_evaluated_once_unless_it_is_remote():
    assert "teacher_eval" in [s.name for s in round_stages(load_recipe(TINY), 1)]
    previous = load_recipe(TINY, ["teacher.source=previous"])
    assert "teacher_eval" not in [s.name for s in round_stages(previous, 1)]


def test_best_without_a_model_needs_the_bootstrap():
    with pytest.raises(InputError, match="teacher source 'best' needs the bootstrap's models"):
        load_recipe(TINY, ["teacher.source=best", "student={source: path, model_name_or_path: s}", "bootstrap=null"])


def record(tmp_path, name, accuracy):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"name": name, "accuracy": accuracy}))
    return p


def metrics(input_acc, sft_acc, dpo_acc):
    return {"input": {"accuracy": input_acc}, "sft": {"accuracy": sft_acc}, "dpo": {"accuracy": dpo_acc}}


def test_a_promoted_student_replaces_the_best_only_when_it_beats_it(tmp_path):
    inputs = {"input": "in", "sft": "sft", "dpo": "dpo", "best_before": "teacher",
              "best_before_record": record(tmp_path, "teacher", 0.80)}
    # promoted DPO at 0.78 is below the teacher's 0.80: the teacher stays the best
    assert best_so_far(inputs, metrics(0.7, 0.75, 0.78), "dpo", 3) == (Path("teacher"),
                                                                         {"name": "teacher", "accuracy": 0.80})
    # promoted SFT at 0.82 passes it
    path, rec = best_so_far(inputs, metrics(0.7, 0.82, 0.78), "sft", 3)
    assert str(path) == "sft" and rec == {"name": "round 3 sft", "accuracy": 0.82}
    # a tie keeps the model that got there first
    assert best_so_far(inputs, metrics(0.7, 0.80, 0.5), "sft", 3)[1]["name"] == "teacher"


def test_without_an_evaluated_teacher_round_one_starts_from_its_input(tmp_path):
    path, rec = best_so_far({"input": "in", "sft": "sft", "dpo": "dpo"}, metrics(0.3, 0.2, 0.25), "input", 1)
    assert str(path) == "in" and rec == {"name": "round 1 input", "accuracy": 0.3}
