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


def answers(**right: list[int]) -> list[dict]:
    """Greedy answers on 40 prompts: model -> the prompt numbers it got right."""
    return [{"model": m, "prompt_id": f"p{i}", "verified": i in ok, "reward": float(i in ok)}
            for m, ok in right.items() for i in range(40)]


def teacher_record(tmp_path, right: list[int]) -> Path:
    p = tmp_path / "record.json"
    p.write_text(json.dumps({"name": "teacher", "accuracy": len(right) / 40,
                             "outcomes": {f"p{i}": float(i in right) for i in range(40)}}))
    return p


def decide_best(tmp_path, rule: str, teacher_right: list[int], promoted_right: list[int]):
    gate = load_recipe(TINY, [f"gate.best_so_far={rule}"]).gate
    rows = answers(input=[], sft=promoted_right, dpo=[])
    metrics = {m: {"accuracy": sum(r["verified"] for r in rows if r["model"] == m) / 40} for m in ("input", "sft", "dpo")}
    inputs = {"input": "in", "sft": "sft", "dpo": "dpo", "best_before": "teacher",
              "best_before_record": teacher_record(tmp_path, teacher_right)}
    path, rec = best_so_far(gate, inputs, metrics, rows, "sft", 3)
    return str(path), rec


# The teacher is right on prompts 0-31 (0.800).
TEACHER = list(range(32))


def test_a_higher_accuracy_replaces_the_best_under_either_rule(tmp_path):
    for rule in ("higher", "not_worse"):  # 34 right: 0-31 and 32-33 -> 0.850
        path, rec = decide_best(tmp_path, rule, TEACHER, list(range(34)))
        assert path == "sft" and rec["name"] == "round 3 sft" and rec["accuracy"] == 0.85


def test_a_student_within_noise_of_the_teacher_replaces_it_only_under_not_worse(tmp_path):
    # 31 right: wrong on 29, 30, 31 (the teacher right), right on 32, 33 (the teacher wrong): 0.775.
    # Discordant pairs 3 against 2: McNemar two-sided p = 2 * (C(5,0) + C(5,1) + C(5,2)) / 2^5 = 32/32 -> 1.0
    promoted = list(range(29)) + [32, 33]
    path, rec = decide_best(tmp_path, "higher", TEACHER, promoted)
    assert path == "teacher" and rec["name"] == "teacher"
    path, rec = decide_best(tmp_path, "not_worse", TEACHER, promoted)
    assert path == "sft" and rec["accuracy"] == 31 / 40
    assert rec["versus_teacher"]["p_value"] == 1.0 and rec["versus_teacher"]["difference"] == -1 / 40


def test_a_student_significantly_worse_than_the_teacher_never_replaces_it(tmp_path):
    # 22 right: wrong on 22-31 where the teacher is right, right nowhere else: 10 against 0,
    # McNemar p = 2 * C(10,0) / 2^10 = 2/1024 < 0.05
    path, rec = decide_best(tmp_path, "not_worse", TEACHER, list(range(22)))
    assert path == "teacher" and rec["name"] == "teacher"


def test_without_an_evaluated_teacher_round_one_starts_from_its_input(tmp_path):
    gate = load_recipe(TINY).gate
    rows = answers(input=list(range(12)), sft=list(range(8)), dpo=list(range(10)))
    metrics = {"input": {"accuracy": 0.3}, "sft": {"accuracy": 0.2}, "dpo": {"accuracy": 0.25}}
    path, rec = best_so_far(gate, {"input": "in", "sft": "sft", "dpo": "dpo"}, metrics, rows, "input", 1)
    assert str(path) == "in" and rec["name"] == "round 1 input" and rec["accuracy"] == 0.3


def test_promote_carries_a_hub_model_forward_when_it_stays_the_best(tmp_path):
    # The Llama 3.1 recipes start from a pinned hub id (meta-llama/Llama-3.1-8B at a commit), and `teacher: {source:
    # best, model_name_or_path: <hub id>}` names the teacher by one. The runner hands a stage a pinned hub model as
    # its commit's snapshot folder in the hub cache; round 1's promote hands that folder on whenever nothing passes
    # the gate (the input carries on) or the teacher stays the best (the usual case: a 405B teacher beats an 8B
    # student). By hand: input right on all 4 prompts, sft and dpo on none -> both refused by the default
    # tolerance, "input" promoted (accuracy 1.0); the teacher's record is 1.0 too and a tie keeps the teacher.
    # Round 2 must then start from the student's snapshot and sample from the teacher's.
    import os

    from alignment.manifest import write_json_atomic
    from alignment.prompts import write_jsonl
    from alignment.inputs import identity, stage_dir
    from alignment.round import stage_config
    from alignment.runner import run_job

    recipe = load_recipe(TINY, [f"runs_dir={tmp_path / 'runs'}", "student={source: path, model_name_or_path: org/student}",
                                "teacher={source: best, model_name_or_path: org/teacher}"])
    eval_dir, folder = stage_dir(recipe, 1, "eval"), stage_dir(recipe, 1, "promote")
    eval_dir.mkdir(parents=True)
    folder.mkdir(parents=True)
    answers = [{"model": m, "prompt_id": f"p{i}", "verified": m == "input", "reward": float(m == "input")}
               for m in ("input", "sft", "dpo") for i in range(4)]
    write_jsonl(eval_dir / "answers.jsonl", answers)
    metrics = {m: {"accuracy": float(m == "input"), "mean_reward": float(m == "input")} for m in ("input", "sft", "dpo")}
    write_json_atomic(eval_dir / "metrics.json", metrics)
    snapshots = {m: tmp_path / "hub" / f"models--org--{m}" / "snapshots" / ("c" * 40) for m in ("student", "teacher")}
    for m in [tmp_path / "sft", tmp_path / "dpo", *snapshots.values()]:
        m.mkdir(parents=True)
    (tmp_path / "teacher_record.json").write_text(json.dumps({"name": "teacher", "accuracy": 1.0}))
    inputs = {"metrics": eval_dir / "metrics.json", "answers": eval_dir / "answers.jsonl", "input": snapshots["student"],
              "sft": tmp_path / "sft", "dpo": tmp_path / "dpo", "best_before": snapshots["teacher"],
              "best_before_record": tmp_path / "teacher_record.json"}
    job = {"stage": "promote", "round": 1, "recipe_name": recipe.name, "recipe_file": TINY, "overrides": [],
           "config": stage_config(recipe, "promote"), "fingerprint": "fp",
           "inputs": {k: {"path": str(v), "hash": "h"} for k, v in inputs.items()}}
    write_json_atomic(folder / "job.json", job)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # wherever the command runs from
    try:
        manifest = run_job(folder / "job.json")
        assert json.loads((folder / "decision.json").read_text())["promoted"] == "input"
        assert identity(recipe, Upstream("promote", "model", 1, "round 2"))["path"] == str(snapshots["student"])
        assert identity(recipe, Upstream("promote", "best", 1, "round 2"))["path"] == str(snapshots["teacher"])
    finally:
        os.chdir(cwd)
    assert manifest["stats"]["best_so_far"] == {"name": "teacher", "accuracy": 1.0}


def test_a_moved_run_folder_resolves_a_promoted_model_inside_it_and_a_best_model_outside_it(tmp_path):
    # A teacher named by a local path outside the runs folder stays the best (its record 1.0 ties the promoted dpo's
    # 1.0, and a tie keeps the best); dpo, trained inside the run folder, is promoted (right on all 4 prompts, the
    # input and sft on none). After the runs folder moves, round 2 must find the dpo model in the new place and the
    # teacher where it always was. Before the fix, `best` was recorded as '../../../../teacher' from the promote
    # folder: right until the run folder moved, then a path to nothing ("did not write its outputs").
    import os
    import shutil

    from alignment.manifest import write_json_atomic
    from alignment.prompts import write_jsonl
    from alignment.inputs import identity, stage_dir
    from alignment.round import stage_config
    from alignment.runner import run_job

    teacher_dir = tmp_path / "models" / "teacher"
    teacher_dir.mkdir(parents=True)
    overrides = ["teacher={source: best, model_name_or_path: org/teacher}"]
    recipe = load_recipe(TINY, [f"runs_dir={tmp_path / 'runs'}", *overrides])
    eval_dir, folder = stage_dir(recipe, 1, "eval"), stage_dir(recipe, 1, "promote")
    sft_dir, dpo_dir = stage_dir(recipe, 1, "sft") / "model", stage_dir(recipe, 1, "dpo") / "model"
    for d in (eval_dir, folder, sft_dir, dpo_dir):
        d.mkdir(parents=True)
    write_jsonl(eval_dir / "answers.jsonl", [{"model": m, "prompt_id": f"p{i}", "verified": m == "dpo",
                                              "reward": float(m == "dpo")} for m in ("input", "sft", "dpo")
                                             for i in range(4)])
    write_json_atomic(eval_dir / "metrics.json", {m: {"accuracy": float(m == "dpo"), "mean_reward": float(m == "dpo")}
                                                  for m in ("input", "sft", "dpo")})
    (tmp_path / "teacher_record.json").write_text(json.dumps({"name": "teacher", "accuracy": 1.0}))
    inputs = {"metrics": eval_dir / "metrics.json", "answers": eval_dir / "answers.jsonl",
              "input": tmp_path / "models" / "student", "sft": sft_dir, "dpo": dpo_dir, "best_before": teacher_dir,
              "best_before_record": tmp_path / "teacher_record.json"}
    job = {"stage": "promote", "round": 1, "recipe_name": recipe.name, "recipe_file": TINY, "overrides": [],
           "config": stage_config(recipe, "promote"), "fingerprint": "fp",
           "inputs": {k: {"path": str(v), "hash": "h"} for k, v in inputs.items()}}
    write_json_atomic(folder / "job.json", job)
    manifest = run_job(folder / "job.json")
    assert manifest["stats"]["promoted"] == "dpo" and manifest["stats"]["best_so_far"]["name"] == "teacher"
    assert manifest["outputs"]["model"] == os.path.join("..", "dpo", "model")
    assert manifest["outputs"]["best"] == str(teacher_dir)

    shutil.move(tmp_path / "runs", tmp_path / "moved")
    moved = load_recipe(TINY, [f"runs_dir={tmp_path / 'moved'}", *overrides])
    assert identity(moved, Upstream("promote", "model", 1, "round 2"))["path"] == str(stage_dir(moved, 1, "dpo") / "model")
    assert identity(moved, Upstream("promote", "best", 1, "round 2"))["path"] == str(teacher_dir)
