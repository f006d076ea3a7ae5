"""The checks before work: one ordered list, run by each command as far as it needs. The schema decides only what the
YAML alone decides, so a recipe that names a missing folder or package loads anywhere and is refused here."""

import re
from pathlib import Path

import pytest

from alignment import preflight
from alignment.cli import main as align
from alignment.config import InputError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny.yaml")


def test_the_checks_run_in_one_order_and_each_command_runs_its_own():
    names = [name for name, _, _ in preflight.CHECKS]
    assert names == ["prompts", "environment", "models", "stage inputs", "code checks decided outside", "machine",
                     "memory"]
    runs = {cmd: [name for name, commands, _ in preflight.CHECKS if cmd in commands]
            for cmd in ("validate", "round", "eval", "stage", "status")}
    assert runs["status"] == ["prompts"]  # read-only commands stay offline and quick
    assert runs["eval"] == ["prompts", "environment", "models", "stage inputs", "memory"]  # eval trains nothing
    assert "memory" not in runs["validate"] and runs["round"] == runs["stage"]


@pytest.mark.parametrize("override,message", [
    ("eval.lm_eval_include_path=/nonexistent/tasks", "eval.lm_eval_include_path: /nonexistent/tasks is not a folder"),
    ("sft.report_to=[wandb]", r"sft.report_to \[.wandb.\]: not installed in this environment"),
])
def test_what_the_machine_lacks_is_refused_before_work_but_the_recipe_still_loads(override, message, capsys,
                                                                                  tmp_path):
    load_recipe(TINY, [override])  # the schema does not look at this machine
    with pytest.raises(InputError, match=message):
        preflight.run(TINY, [override], "validate")
    with pytest.raises(SystemExit):
        align(["round", "1", "--recipe", TINY, override, f"runs_dir={tmp_path}"])
    assert re.search(message, capsys.readouterr().err) and not (tmp_path / "tiny").exists()
    align(["status", "--recipe", TINY, override, f"runs_dir={tmp_path}"])  # reading needs none of it


def test_validate_prints_its_notes_after_the_counts(capsys):
    checked = preflight.run(TINY, ["sft.distributed=fsdp", "sft.num_processes=2"], "validate")
    assert (checked.train, checked.held_out) == (8000, 300)  # data/arithmetic: 8000 lines and 300
    assert any(n.startswith("note: this machine cannot run it as written: sft.distributed: fsdp") for n in checked.notes)
    with pytest.raises(InputError, match="this machine cannot train as the recipe asks"):
        preflight.run(TINY, ["sft.distributed=fsdp", "sft.num_processes=2"], "stage", "sft")
