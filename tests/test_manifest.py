import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoTokenizer, TrainingArguments

from alignment import manifest
from alignment.chat import build_tokenizer
from alignment.config import InputError
from alignment.manifest import git_commit, hash_json, hash_model_dir, write_json_atomic
from alignment.inputs import fingerprint
from alignment.seeding import model_identity
from alignment.tiny_models import random_llama
from alignment.tiny_models import save as save_model


def test_hash_json_ignores_key_order_and_is_sha256_of_compact_sorted_json():
    expected = hashlib.sha256(b'{"a":[1,2],"b":{"c":null}}').hexdigest()
    assert hash_json({"b": {"c": None}, "a": [1, 2]}) == expected


def test_fingerprint_changes_with_config_and_with_any_input_identity():
    inputs = {"model": {"path": "m", "hash": "h1"}, "data": {"path": "d", "hash": "h2"}}
    base = fingerprint("sft", {"sft": {"learning_rate": 1e-5}}, inputs)
    assert base == fingerprint("sft", {"sft": {"learning_rate": 1e-5}}, dict(reversed(inputs.items())))
    assert base != fingerprint("sft", {"sft": {"learning_rate": 2e-5}}, inputs)
    assert base != fingerprint("sft", {"sft": {"learning_rate": 1e-5}}, {**inputs, "data": {"path": "d", "hash": "x"}})
    # the path alone is not identity: moving a run folder does not invalidate it
    assert base == fingerprint("sft", {"sft": {"learning_rate": 1e-5}}, {**inputs, "model": {"path": "n", "hash": "h1"}})


def test_atomic_write_leaves_only_the_complete_file(tmp_path):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"x": 1})
    write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_model_dir_identity_sees_a_changed_config(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    before = hash_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 9}')
    assert hash_model_dir(tmp_path) != before


# --- model identity by content ---------------------------------------------------------------------------------

SHAPE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
HOUR_AGO = time.time_ns() - 3600 * 10**9


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own digest cache, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tiny_model(path: Path, tokenizer=None, seed: int = 0) -> Path:
    tok = tokenizer or build_tokenizer()
    return save_model(random_llama(tok, seed=seed, **SHAPE), tok, path)


def trainer_files(folder: Path) -> None:
    """What a Trainer leaves beside the weights: its pickled arguments, naming the absolute output folder, and logs."""
    torch.save(TrainingArguments(output_dir=str(folder), report_to=[]), folder / "training_args.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0}], "output": str(folder)}))
    (folder / "README.md").write_text(f"trained in {folder}\n")


def bump_one_weight(path: Path, mtime_ns: int | None = None) -> None:
    """One value of one tensor changed, the file rewritten in place with the same size (and mtime, if given)."""
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1.0
    size = path.stat().st_size
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(save(tensors, metadata={"format": "pt"}))
    assert path.stat().st_size == size
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def age(folder: Path) -> None:
    """Files last written an hour ago, as a model is by the time a later stage or round reads it."""
    for p in folder.iterdir():
        os.utime(p, ns=(HOUR_AGO, HOUR_AGO))


def test_a_model_copied_elsewhere_beside_other_trainer_files_keeps_its_identity(tmp_path):
    a = tiny_model(tmp_path / "runs-a" / "sft" / "model")
    b = tmp_path / "elsewhere" / "a-longer-runs-folder-on-the-shared-filesystem-of-the-cluster" / "sft" / "model"
    shutil.copytree(a, b)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    trainer_files(a)
    trainer_files(b)
    # the pickled arguments differ with the folder (in size too), and the third copy has none
    assert (a / "training_args.bin").read_bytes() != (b / "training_args.bin").read_bytes()
    assert hash_model_dir(a) == hash_model_dir(b) == hash_model_dir(c)
    assert model_identity(str(a)) == model_identity(str(b)) == model_identity(str(c))
    (c / "training_args.bin").write_bytes(b"\0")  # nor does anything else a trainer writes count
    (c / "optimizer.pt").write_bytes(b"\0")
    (c / ".cache").mkdir()
    (c / ".cache" / "download.lock").write_text("x")
    assert hash_model_dir(c) == hash_model_dir(a)


def test_other_weights_in_files_of_the_same_names_and_sizes_are_another_model(tmp_path):
    a, b = tiny_model(tmp_path / "a"), tiny_model(tmp_path / "b", seed=1)
    sizes = lambda folder: {p.name: p.stat().st_size for p in folder.iterdir()}  # noqa: E731
    assert sizes(a) == sizes(b) and hash_model_dir(a) != hash_model_dir(b)


def test_one_changed_weight_value_changes_the_identity(tmp_path):
    model = tiny_model(tmp_path / "m")
    before = hash_model_dir(model)
    bump_one_weight(model / "model.safetensors")
    assert hash_model_dir(model) != before


def test_a_changed_tokenizer_changes_the_identity(tmp_path):
    """A real tokenizer.json is megabytes (Llama 3's is 9 MB): one token's text changed, at the same size."""
    tok = build_tokenizer()
    tok.add_tokens([f"<extra_{i:05d}>" for i in range(20_000)])
    model = tiny_model(tmp_path / "m", tok)
    path = model / "tokenizer.json"
    assert path.stat().st_size > 1 << 20
    before = hash_model_dir(model)
    path.write_text(path.read_text().replace("<extra_00007>", "<extrb_00007>"))
    assert path.stat().st_size > 1 << 20 and AutoTokenizer.from_pretrained(model).convert_ids_to_tokens(
        len(build_tokenizer()) + 7) == "<extrb_00007>"
    assert hash_model_dir(model) != before
    changed = hash_model_dir(model)
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("assistant", "assistent"))
    assert hash_model_dir(model) != changed


def test_cached_digests_are_used_and_a_stale_one_is_not_trusted(tmp_path, monkeypatch):
    model = tiny_model(tmp_path / "m")
    age(model)
    first = hash_model_dir(model)
    hashed = []
    real_hash = manifest.hash_file
    monkeypatch.setattr(manifest, "hash_file", lambda p: hashed.append(p.name) or real_hash(p))
    assert hash_model_dir(model) == first and hashed == []  # unchanged files: every digest from the cache
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    bump_one_weight(weights)  # rewritten with the same size: its mtime moved
    second = hash_model_dir(model)
    assert second != first and hashed == ["model.safetensors"]
    # another version put in its place with the same size and mtime (as `cp -p` or `rsync -t` do): another inode
    os.utime(weights, ns=(HOUR_AGO, HOUR_AGO))
    assert hash_model_dir(model) == second  # (cached again, now that it is settled)
    shutil.copy2(weights, tmp_path / "next.safetensors")
    bump_one_weight(tmp_path / "next.safetensors", mtime_ns=HOUR_AGO)
    os.replace(tmp_path / "next.safetensors", weights)
    assert weights.stat().st_size == size and weights.stat().st_mtime_ns == HOUR_AGO
    third = hash_model_dir(model)
    assert third not in (first, second)


def test_a_file_rewritten_within_one_clock_tick_is_not_taken_from_the_cache(tmp_path):
    """A file hashed just after it was written, then rewritten in place with the same size so fast that its mtime
    did not move (a coarse filesystem clock): the same path, size, mtime and inode, other content."""
    model = tiny_model(tmp_path / "m")
    weights = model / "model.safetensors"
    before = hash_model_dir(model)
    bump_one_weight(weights, mtime_ns=weights.stat().st_mtime_ns)
    assert hash_model_dir(model) != before


def test_a_moved_model_misses_the_cache_and_a_damaged_cache_is_ignored(tmp_path):
    model = tiny_model(tmp_path / "m")
    age(model)
    first = hash_model_dir(model)
    cache = manifest.digest_cache(model.resolve())
    assert sorted(Path(p).name for p in json.loads(cache.read_text())["files"]) == sorted(
        p.name for p in model.iterdir())
    moved = tmp_path / "moved"
    model.rename(moved)
    bump_one_weight(moved / "model.safetensors", mtime_ns=HOUR_AGO)  # same inode, size and mtime as the cached one
    assert hash_model_dir(moved) != first
    cache.write_text('{"files": {"x": ')
    assert hash_model_dir(tiny_model(tmp_path / "m")) == first


def test_weights_are_what_the_loaders_read_and_a_folder_without_them_is_named(tmp_path):
    model = tiny_model(tmp_path / "m")
    with_safetensors = hash_model_dir(model)
    torch.save({"x": torch.zeros(2)}, model / "pytorch_model.bin")  # beside safetensors no loader reads it
    assert hash_model_dir(model) == with_safetensors
    (model / "model.safetensors").unlink()
    only_bin = hash_model_dir(model)
    torch.save({"x": torch.ones(2)}, model / "pytorch_model.bin")
    assert hash_model_dir(model) != only_bin
    (model / "pytorch_model.bin").unlink()
    with pytest.raises(InputError, match=rf"{model}: a model folder without weights \(expected \*.safetensors"):
        hash_model_dir(model)


def test_the_commit_recorded_is_the_codes_wherever_the_command_runs(tmp_path, monkeypatch):
    root = Path(manifest.__file__).resolve().parents[1]
    here = git_commit()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert here is None if not sha else here.startswith(sha)
    monkeypatch.chdir(tmp_path)  # a run folder outside any checkout, as the moved round runs from
    assert git_commit() == here
