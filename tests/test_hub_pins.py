"""A Hub id without a revision: the first command that starts work pins `main`'s commit for the whole run, says so,
and records it; later commands read the pin even after `main` moves; a revision in the recipe wins."""

import json
import sys
from pathlib import Path

import huggingface_hub.constants as c
import pytest

from alignment import preflight
from alignment.cli import main as align
from alignment.config import InputError

sys.path.insert(0, str(Path(__file__).parent))
from hub_configs import write_snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny.yaml")
OLD, NEW = "a" * 40, "b" * 40
ROWS = "".join(json.dumps({"prompt_id": f"q{i}", "messages": [{"role": "user", "content": f"What is {i} + 1?"}],
                           "answer": str(i + 1)}) + "\n" for i in range(6))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A student model and a prompt dataset in an offline Hub cache, `main` at OLD."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    at(tmp_path, OLD)
    return tmp_path


def at(tmp_path: Path, commit: str) -> None:
    """`main` of both repos moves to `commit`."""
    write_snapshot(tmp_path / "hub", "model", "org/student", commit, {"config.json": "{}"})  # (checks read no more)
    write_snapshot(tmp_path / "hub", "dataset", "org/prompts", commit, {"train.jsonl": ROWS})


def overrides(tmp_path: Path) -> list[str]:
    return [f"runs_dir={tmp_path / 'runs'}", "student={source: path, model_name_or_path: org/student}",
            "prompts.train_path={dataset: org/prompts, split: train}", "prompts.num_prompts=4"]


def test_the_first_round_pins_main_and_every_later_command_reads_the_pin(hub_cache, capsys):
    pins = hub_cache / "runs" / "tiny" / "pins.json"
    checked = preflight.run(TINY, overrides(hub_cache), "validate")  # validate only names what a round will pin
    assert checked.recipe.student.revision is None and not pins.exists()
    assert any("student.revision: org/student (model) has no revision; the first `align round` resolves" in n
               for n in checked.notes)

    checked = preflight.run(TINY, overrides(hub_cache), "round")
    assert checked.recipe.student.revision == OLD and checked.recipe.prompts.train_path.revision == OLD
    assert [n.split(":")[1].strip() for n in checked.notes] == ["student.revision", "prompts.train_path.revision"]
    assert all(n.startswith("notice: ") and f"commit {OLD}, recorded in {pins}" in n for n in checked.notes)
    recorded = json.loads(pins.read_text())
    assert recorded["model"]["org/student"]["commit"] == recorded["dataset"]["org/prompts"]["commit"] == OLD

    at(hub_cache, NEW)  # main moves on: the run still reads what it started with, and says nothing more
    later = preflight.run(TINY, overrides(hub_cache), "stage", "generate")
    assert later.recipe.student.revision == OLD and later.recipe.prompts.train_path.revision == OLD
    assert later.notes == []
    assert preflight.run(TINY, overrides(hub_cache), "status").recipe.student.revision == OLD  # READS see the pin too
    # a revision the recipe gives wins over the pin
    given = preflight.run(TINY, [*overrides(hub_cache), f"student.revision={NEW}"], "round").recipe
    assert given.student.revision == NEW and given.prompts.train_path.revision == OLD

    # a new run (another name) pins today's main, and `align` prints the notice
    align(["validate", TINY, *overrides(hub_cache), "name=other"])
    assert "the first `align round` resolves `main`" in capsys.readouterr().out
    second = preflight.run(TINY, [*overrides(hub_cache), "name=other"], "round")
    assert second.recipe.student.revision == NEW


def test_the_pinned_commit_is_in_the_stage_inputs_that_manifests_record(hub_cache):
    from alignment.inputs import identity
    from alignment.prompts import source_identity
    from alignment.stage_table import student

    recipe = preflight.run(TINY, overrides(hub_cache), "round").recipe
    assert identity(recipe, student(recipe, 1))["revision"] == OLD
    assert source_identity(recipe.prompts.train_path, "prompts.train_path")["source"]["revision"] == OLD


def test_a_damaged_pins_file_is_named(hub_cache):
    pins = hub_cache / "runs" / "tiny" / "pins.json"
    pins.parent.mkdir(parents=True)
    pins.write_text("{not json")
    with pytest.raises(InputError, match=f"{pins}: cannot read the run's pinned Hub commits: .*remove it"):
        preflight.run(TINY, overrides(hub_cache), "round")
