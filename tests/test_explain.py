"""`align explain`: the schema's descriptions reach the user, for every key, with no hand-kept list of names."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

import alignment.explain as explain_module
from alignment.cli import main
from alignment.config import Recipe
from alignment.explain import explain

ROOT = Path(__file__).resolve().parents[1]


def align(capsys, *args) -> tuple[int, str, str]:
    try:
        main(["explain", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def flat(text: str) -> str:
    return " ".join(text.split())  # descriptions are wrapped to the terminal's width


def test_a_leaf_prints_its_type_default_and_description(capsys):
    code, out, _ = align(capsys, "dpo.beta")
    assert code == 0
    assert out == "dpo.beta: float\n  default: 0.1\n  DPO temperature (Llama 3: 0.1)\n"
    code, out, _ = align(capsys, "sft.learning_rate")
    assert code == 0
    assert out == "sft.learning_rate: float\n  default: required\n  peak learning rate (Llama 3: 1e-5)\n"


def test_leaf_types_and_defaults_read_as_yaml(capsys):
    assert explain("teacher.backend").splitlines()[:2] == [
        'teacher.backend: "transformers" | "vllm" | "openai"', "  default: transformers"]
    assert explain("sft.distributed").splitlines()[:2] == [
        'sft.distributed: "ddp" | "fsdp" | "zero3" | null', "  default: null"]
    assert explain("dpo.loss_type").splitlines()[:2] == ["dpo.loss_type: list[str]", '  default: ["sigmoid", "sft"]']
    assert explain("gate.tolerances").splitlines()[:2] == [
        "gate.tolerances: dict[str, float]", '  default: {"accuracy": 0.0}']
    assert explain("sft.gradient_checkpointing").splitlines()[1] == "  default: true"
    # a path or a section: the description says both, and the section's fields are listed
    train = explain("prompts.train_path")
    assert train.startswith("prompts.train_path: section | null = null\n") and "a path (the project's JSONL" in train
    assert "  revision: str | null = null" in train.splitlines()


def test_a_section_lists_every_field(capsys):
    code, out, _ = align(capsys, "teacher.engine")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "teacher.engine: section = its fields' defaults"
    assert "  tensor_parallel_size: int = 1" in lines
    assert '  quantization: "fp8" | "fbgemm_fp8" | null = null' in lines
    assert "  gpu_memory_utilization: float = 0.9" in lines
    assert "GPUs one model copy is split over (405B FP8: 8)" in out
    # sections reached through a list, and nested sections point at their own explain
    out = explain("reward.verifiers")
    assert out.startswith("reward.verifiers: list[section] = []\n")
    assert '  kind: "answer" | "code" = answer' in out.splitlines()
    assert "  answer_regex: str = -?\\d+" in out.splitlines()
    assert "  lora: section | null = null   (fields: align explain sft.lora)" in explain("sft").splitlines()
    assert explain("sft").startswith("sft: section (required)\n")


def test_no_key_lists_the_top_level_keys(capsys):
    code, out, _ = align(capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.startswith("  ") and line.split()}
    assert list(rows) == ["name", "seed", "runs_dir", "rounds", "prompts", "student", "teacher", "sampling", "reward",
                          "select", "sft", "dpo", "revise", "dialogs", "reward_training", "eval", "gate", "bootstrap",
                          "gguf", "launcher"]
    assert rows["sft"].split()[1:3] == ["section", "(required)"]
    assert rows["bootstrap"].split()[1:4] == ["section", "|", "null"]
    assert "build tiny models in code (no download)" in rows["bootstrap"]
    assert rows["seed"].split()[1] == "int" and "seeds sampling" in rows["seed"]


@pytest.mark.parametrize("key,nearest", [("dpo.bta", "dpo.beta"), ("beta", "dpo.beta"),
                                         ("sft.learning_rat", "sft.learning_rate"),
                                         ("teacher.engine.dtyp", "teacher.engine.dtype"),
                                         ("dpo.beta.x", "dpo.beta")])
def test_an_unknown_key_names_the_nearest_ones(capsys, key, nearest):
    code, out, err = align(capsys, key)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert repr(key) in err and nearest in err.split("nearest:")[1].replace(",", " ").split()


def test_the_console_command_fails_cleanly():
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", "explain", "sft.lerning_rate"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: unknown recipe key 'sft.lerning_rate'; nearest: sft.learning_rate\n"


def schema_fields(model, prefix=""):
    """Every (dotted key, description) of the schema, walked here independently of alignment.explain."""
    for name, field in model.model_fields.items():
        yield prefix + name, field.description
        todo = [field.annotation]
        while todo:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from schema_fields(t, f"{prefix}{name}.")
                break
            todo.extend(typing.get_args(t))


def test_every_field_of_every_section_prints_its_description():
    fields = dict(schema_fields(Recipe))
    assert len(fields) > 150 and "teacher.engine.dtype" in fields and "reward.judge.verdict_regex" in fields
    for key, text in fields.items():
        assert text and text.strip(), f"{key} has no description"
        assert flat(text) in flat(explain(key)), key
        parent = key.rpartition(".")[0]
        if parent:  # (the top-level listing shows each key's first clause)
            assert flat(text) in flat(explain(parent)), f"{parent} does not show {key}"
    assert set(fields) == set(explain_module.all_keys())


class Inner(BaseModel):
    depth: int = Field(3, description="how deep")


class Toy(BaseModel):
    """A schema with shapes the recipe does not have (yet): a dict of sections, a list of optional sections."""

    by_name: dict[str, Inner] = Field({}, description="inner sections by name")
    maybe: list[Inner | None] | None = Field(None, description="optional list")


def test_the_walk_follows_annotations_not_names(monkeypatch):
    monkeypatch.setattr(explain_module, "Recipe", Toy)
    assert explain("by_name.depth") == "by_name.depth: int\n  default: 3\n  how deep"
    assert "  depth: int = 3" in explain("maybe").splitlines()
    assert explain("maybe").startswith("maybe: list[section | null] | null = null\n")
    assert set(explain_module.all_keys()) == {"by_name", "by_name.depth", "maybe", "maybe.depth"}


def test_a_key_as_validation_errors_write_it_with_a_list_index_is_explained():
    # `align validate` reports "recipes/x.yaml:31: reward.verifiers.0.answer_regex: does not compile"; pasting
    # that key into `align explain` must explain the field, not call it unknown.
    out = explain("reward.verifiers.0.answer_regex")
    assert out.startswith("reward.verifiers.0.answer_regex: str\n  default: -?\\d+\n")
    assert "regex for candidate answers" in flat(out)
    assert explain("reward.verifiers.1").startswith("reward.verifiers.1: list[section] = []\n")
    with pytest.raises(Exception, match="unknown recipe key 'dpo.0'"):  # only a list takes an index
        explain("dpo.0")


def test_transport_fields_are_marked_where_they_are_declared_and_explained_as_such():
    # the teacher fields that change how requests travel and never what is sampled, listed here by hand: the
    # fingerprint leaves out exactly these, and `align explain` says so for each (and for no other field)
    from alignment.stage_table import TEACHER_TRANSPORT

    by_hand = {"serve", "server_port", "server_startup_timeout_s", "endpoints", "api_key_env", "max_concurrency",
               "request_timeout_s", "max_retries", "retry_backoff_s"}
    assert TEACHER_TRANSPORT == by_hand
    for name in ("serve", "max_retries", "batch_size", "engine.max_model_len"):
        assert ("transport: not hashed" in explain(f"teacher.{name}")) is (name in by_hand), name
