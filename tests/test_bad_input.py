"""Bad input gets one `error:` line that names the file, line or key, before any work: never a traceback, never a
silently wrong value. And one writer per run folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.cli import main as align
from alignment.config import InputError, load_recipe
from alignment.round import run_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "recipes/tiny.yaml").read_text()


def error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        align(list(argv))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in err and err.startswith("error: "), err
    return err


def recipe_file(tmp_path, text: str | bytes) -> str:
    p = tmp_path / "r.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = 'a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
    for i, name in enumerate("bcdefghi"):  # each level repeats the previous one ten times: 10^9 strings
        prev = "abcdefghi"[i]
        bomb += f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]\n"
    with pytest.raises(InputError, match="expands to more than 100000 values through its aliases"):
        load_recipe(recipe_file(tmp_path, bomb))


def test_a_key_given_twice_names_both_lines(tmp_path):
    lines = TINY.count("\n")
    text = TINY + "sampling:\n  num_samples: 1\n  temperature: 0\n  max_new_tokens: 1\n"
    first = next(i for i, line in enumerate(TINY.splitlines(), 1) if line.startswith("sampling:"))
    with pytest.raises(InputError, match=rf"r.yaml:{lines + 1}: key 'sampling' is given twice \(first on line "
                                         rf"{first}\)"):
        load_recipe(recipe_file(tmp_path, text))
    nested = TINY.replace("  temperature: 1.0\n", "  temperature: 1.0\n  temperature: 0.0\n", 1)
    with pytest.raises(InputError, match="key 'temperature' is given twice"):
        load_recipe(recipe_file(tmp_path, nested))


@pytest.mark.parametrize("override, key", [
    ("sampling.temperature=.inf", "sampling.temperature"), ("sampling.temperature=.nan", "sampling.temperature"),
    ("dpo.beta=.nan", "dpo.beta"), ("select.sft_min_reward=.nan", "select.sft_min_reward"),
    ("select.pair_min_margin=.inf", "select.pair_min_margin"),
    ("reward.verifiers=[{name: a, weight: .inf}]", "reward.verifiers.0.weight"),
    ("sampling.max_new_tokens=1e12", "sampling.max_new_tokens"), ("eval.max_new_tokens=2000000", "eval.max_new_tokens"),
    ("name=..", "name"), ("name=.hidden", "name"),
])
def test_values_that_cannot_be_meant_are_refused_by_key(override, key):
    with pytest.raises(InputError, match=rf"command-line override: {key}: "):
        load_recipe(ROOT / "recipes/tiny.yaml", [override])


def test_unreadable_files_and_overrides_are_one_clear_line(tmp_path, capsys):
    assert "not UTF-8 text (byte 7)" in error(capsys, "validate", recipe_file(tmp_path, b"name: \xff\xfe\n"))
    tiny = str(ROOT / "recipes/tiny.yaml")
    assert "a prompt folder holds .jsonl, .parquet or .arrow files of one kind, or a save_to_disk dataset; this one " \
        "has none of them" in error(capsys, "validate", tiny, f"prompts.train_path={tmp_path}")
    err = error(capsys, "validate", tiny, "sampling.num_samples=[1,2")
    assert "override 'sampling.num_samples=[1,2': the value is not plain YAML" in err
    err = error(capsys, "validate", tiny, "sampling.num_samples=!!python/object/apply:os.system [echo hi]")
    assert "the value is not plain YAML" in err
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert f"{deep}:1: JSON nested too deeply" in error(capsys, "validate", tiny, f"prompts.train_path={deep}")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt_id": "a", "messages": [{"role": "user", "content": "hi"}]}\n{"x": "caf\xe9"}\n')
    assert f"{bad}:2: not UTF-8 text" in error(capsys, "validate", tiny, f"prompts.train_path={bad}")


def test_a_truncated_manifest_is_named_not_a_traceback(tmp_path, capsys):
    folder = tmp_path / "tiny" / "round-1" / "generate"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"stage": "gen')
    err = error(capsys, "status", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path}")
    assert f"{folder / 'manifest.json'}: not a readable manifest" in err and "delete it" in err


def test_a_second_writer_fails_at_once_naming_the_first_and_kill_9_frees_the_folder(tmp_path, capsys):
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", [f"runs_dir={tmp_path}"])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from alignment.config import load_recipe; "
         "from alignment.round import run_lock; r = load_recipe('recipes/tiny.yaml', sys.argv[1:]); "
         "lock = run_lock(r); lock.__enter__(); print('locked', flush=True); time.sleep(600)", f"runs_dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = error(capsys, "round", "1", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path}")
        assert f"{tmp_path / 'tiny'} is in use by another run (pid {holder.pid}: -c runs_dir={tmp_path})" in err
        assert not (tmp_path / "tiny" / "bootstrap").exists()  # nothing started
        # `align stage` too: the lock is what it names, not what it would meet without one (sft's missing inputs)
        err = error(capsys, "stage", "sft", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path}")
        assert err == f"error: {tmp_path / 'tiny'} is in use by another run (pid {holder.pid}: -c runs_dir={tmp_path}); " \
            "wait for it to finish, or stop it\n"
        align(["status", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path}"])  # reading is fine
        assert "missing" in capsys.readouterr().out
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with run_lock(recipe):  # the kernel released the dead holder's lock
        assert (tmp_path / "tiny" / ".lock").read_text().startswith(f"pid {os.getpid()}: ")


def prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_numeric_answer_is_refused_not_left_unscored(tmp_path):
    from alignment.prompts import read_prompts

    bad = prompts(tmp_path / "p.jsonl", [{"prompt_id": "a", "messages": [{"role": "user", "content": "1+1?"}],
                                          "answer": "2"},
                                         {"prompt_id": "b", "messages": [{"role": "user", "content": "2+2?"}],
                                          "answer": 4}])
    with pytest.raises(InputError, match=rf"{bad}:2: prompt 'b': answer must be a string, got int 4"):
        read_prompts(bad)


def test_the_same_question_under_a_new_id_is_caught_as_leakage(tmp_path, capsys):
    q = lambda pid, text: {"prompt_id": pid, "messages": [{"role": "user", "content": text}], "answer": "1"}  # noqa
    train = prompts(tmp_path / "train.jsonl", [q("t1", "What is 7 + 5?"), q("t2", "What is 1 + 0?")])
    held = prompts(tmp_path / "eval.jsonl", [q("e1", "what is  7 +\t5?"), q("e2", "What is 2 + 2?")])
    err = error(capsys, "validate", str(ROOT / "recipes/tiny.yaml"), f"prompts.train_path={train}",
                f"prompts.eval_path={held}")
    assert f"{held}: 1 held-out prompts ask what a training prompt asks (case and spacing aside), e.g. 'e1' = 't1'" \
        in err
    held = prompts(tmp_path / "eval2.jsonl", [q("e1", "What is 7 + 50?")])  # a different question passes
    align(["validate", str(ROOT / "recipes/tiny.yaml"), f"prompts.train_path={train}", f"prompts.eval_path={held}"])


@pytest.mark.parametrize("override, key", [
    ("student={source: path, model_name_or_path: /nowhere/student}", "student.model_name_or_path"),
    ("teacher={source: path, model_name_or_path: ./no/teacher}", "teacher.model_name_or_path"),
    ("reward.reward_model={model_name_or_path: /nowhere/rm}", "reward.reward_model.model_name_or_path"),
    ("dpo.ref_model_name_or_path=/nowhere/ref", "dpo.ref_model_name_or_path"),
])
def test_a_model_that_does_not_exist_is_named_by_its_key_before_any_work(override, key, tmp_path, capsys):
    err = error(capsys, "round", "1", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path}", override)
    assert f"error: {key}: " in err and "does not exist" in err
    assert not any(tmp_path.iterdir())  # not even the bootstrap started


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = error(capsys, "validate", str(ROOT / "recipes/tiny.yaml"), f"dpo.ref_model_name_or_path={tmp_path / 'empty'}")
    assert "is a folder without config.json" in err


HUB_KEYS = [  # every model key: (overrides naming a Hub id, the key, its revision key)
    (["student={source: path, model_name_or_path: some-org/some-model}"], "student.model_name_or_path", "student.revision"),
    (["teacher={source: path, model_name_or_path: some-org/some-model}"], "teacher.model_name_or_path", "teacher.revision"),
    (["reward.reward_model={model_name_or_path: some-org/some-model}"], "reward.reward_model.model_name_or_path",
     "reward.reward_model.revision"),
    (["dpo.ref_model_name_or_path=some-org/some-model"], "dpo.ref_model_name_or_path", "dpo.ref_model_revision"),
]


@pytest.mark.parametrize("overrides,key,rev_key", HUB_KEYS)
def test_an_unpinned_hub_id_that_cannot_be_resolved_offline_fails_at_once(overrides, key, rev_key, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.time()
    err = error(capsys, "round", "1", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path / 'runs'}",
                *overrides)
    assert err == (f"error: {rev_key}: 'some-org/some-model' has no pinned revision, and its `main` cannot be "
                   "resolved: the Hub cannot be asked (HF_HUB_OFFLINE is set) and the local cache holds no `main` of "
                   "the model 'some-org/some-model'\n")
    assert not (tmp_path / "runs").exists()  # nothing started, no pins file
    err = error(capsys, "validate", str(ROOT / "recipes/tiny.yaml"), *overrides, f"{rev_key}={'ab' * 20}")
    assert f"{key}: 'some-org/some-model' is a Hub id that is not in the local cache" in err
    assert "HF_HUB_OFFLINE is set" in err
    assert time.time() - start < 30  # not transformers' minute of retries (a loose bound: the machine is shared)


def test_a_pinned_hub_model_loads_from_its_commits_snapshot_and_the_manifest_records_the_revision(tmp_path, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it, offline: the stage reads that commit's folder."""
    from alignment.inputs import identity
    from alignment.runner import input_value
    from alignment.stage_table import Model

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"\0" * 16)  # (what identity reads of a local folder)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    got = identity(None, Model("some-org/some-model", "student.model_name_or_path", commit))
    assert got["path"] == "some-org/some-model" and got["revision"] == commit
    assert input_value(got) == snap
    other = identity(None, Model("some-org/some-model", "student.model_name_or_path", "f" * 40))
    assert other["hash"] != got["hash"]  # another commit is another input: the stage is stale
    # a local folder given a revision too is read from where it lies, not looked up in the hub cache
    local = identity(None, Model(str(snap), "student.model_name_or_path", commit))
    assert "revision" not in local and input_value(local) == snap


def test_a_prompt_too_long_for_the_models_context_is_named_before_any_stage(tmp_path, capsys):
    from alignment.chat import build_tokenizer
    from alignment.tiny_models import random_llama, save

    tok = build_tokenizer()
    model = save(random_llama(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=256), tok, tmp_path / "m")
    capsys.readouterr()  # (saving prints progress bars)
    q = lambda pid, text: {"prompt_id": pid, "messages": [{"role": "user", "content": text}], "answer": "1"}  # noqa
    train = prompts(tmp_path / "train.jsonl", [q("a", "What is 1 + 1?"), q("b", "What is 2 + 2?"),
                                               q("c", "x" * 1_000_000), q("d", "What is 3 + 3?")])
    err = error(capsys, "round", "1", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path / 'runs'}",
                f"student={{source: path, model_name_or_path: {model}}}",
                f"teacher={{source: path, model_name_or_path: {model}}}",
                f"prompts.train_path={train}")
    assert f"{train}:3: prompt 'c' is " in err and "with sampling.max_new_tokens=16 it does not fit" in err
    assert "context of 256 tokens" in err
    assert not [p for p in (tmp_path / "runs" / "tiny").iterdir() if p.name != ".lock"]  # no stage started
    # a prompt that fits only without the tokens the answer may add is refused too: 256 - 16 = 240 for the prompt
    fits = prompts(tmp_path / "t2.jsonl", [q("a", "y" * 230)])
    err = error(capsys, "round", "1", "--recipe", str(ROOT / "recipes/tiny.yaml"), f"runs_dir={tmp_path / 'runs'}",
                f"student={{source: path, model_name_or_path: {model}}}",
                f"teacher={{source: path, model_name_or_path: {model}}}",
                f"prompts.train_path={fits}", "sampling.max_new_tokens=100")
    assert f"{fits}:1: prompt 'a'" in err


def test_inputs_only_a_later_stage_reads_are_checked_before_any_work(tmp_path, capsys):
    tiny = str(ROOT / "recipes/tiny.yaml")
    err = error(capsys, "round", "1", "--recipe", tiny, f"runs_dir={tmp_path}",
                f"reward_training.preference_paths=[{tmp_path / 'human.jsonl'}]")
    assert f"reward_training.preference_paths[0]: {tmp_path / 'human.jsonl'} does not exist" in err
    err = error(capsys, "validate", tiny, "eval.lm_eval_tasks=[arithmetic_local, arithmetic_lokal]")
    assert "eval.lm_eval_tasks: ['arithmetic_lokal'] are not lm-eval tasks" in err
    assert not any(tmp_path.iterdir())
