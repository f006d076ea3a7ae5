import hashlib
import json

from alignment.manifest import hash_json, hash_model_dir, write_json_atomic
from alignment.round import fingerprint


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
