"""Pinned Hub models are read at their pinned commit everywhere, and fetched as transformers needs them: the
pre-round checks load the pinned snapshot (offline, with only that snapshot cached, `main` is not there), and the
stages' fetch takes only the files transformers loads (not Meta's `original/` checkpoint), one rank at a time."""

import os
import subprocess
import sys
import threading
from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

from alignment import hub, runner
from alignment.chat import build_tokenizer
from alignment.tiny_models import random_llama

ROOT = Path(__file__).resolve().parents[1]
PINNED, MOVED_ON = "a1" * 20, "b2" * 20


def hub_cache_with_only_the_pinned_snapshot(home: Path, names: list[str]) -> Path:
    """huggingface_hub's layout, hub/models--org--name/{refs/main, snapshots/<commit>/...}: each model's pinned
    commit saved in full, while refs/main names a later commit that was never downloaded (the repo moved on)."""
    tok = build_tokenizer()
    for name in names:
        folder = home / "hub" / f"models--{name.replace('/', '--')}"
        snapshot = folder / "snapshots" / PINNED
        random_llama(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2).save_pretrained(snapshot)
        tok.save_pretrained(snapshot)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(MOVED_ON)
    return home / "hub"


CHECK = """
import sys
from alignment.config import load_recipe
from alignment.preflight import check_round_models
pinned = sys.argv[1]
check_round_models(load_recipe("recipes/tiny.yaml", [
    "student.source=path", "student.model_name_or_path=org/student", f"student.revision={pinned}",
    "teacher.source=path", "teacher.model_name_or_path=org/teacher", f"teacher.revision={pinned}"]), 1)
print("checked")
"""


def test_pre_round_checks_read_the_pinned_snapshot_offline(tmp_path):
    hub = hub_cache_with_only_the_pinned_snapshot(tmp_path, ["org/student", "org/teacher"])
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK, PINNED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-3000:]
    # a commit that is not cached is not silently replaced by another: offline, nothing to read
    proc = subprocess.run([sys.executable, "-c", CHECK, "c3" * 20], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "checked" not in proc.stdout


# The files of meta-llama/Llama-3.1-405B-Instruct-FP8 at the Hub (its "Files" tab): the transformers checkpoint in
# 109 safetensors shards, and under original/ Meta's own consolidated checkpoint.
META_REPO = ["LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
             "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
             *(f"model-{i:05d}-of-00109.safetensors" for i in range(1, 110)),
             "original/params.json", "original/tokenizer.model",
             *(f"original/mp8/consolidated.{i:02d}.pth" for i in range(8))]


def fetched(monkeypatch, x: dict, weights: bool = True) -> list[str]:
    """The repo files snapshot_download would fetch for the input, by huggingface_hub's own pattern filter."""
    asked = {}

    def snapshot_download(repo_id, **kw):
        asked.update(kw, repo_id=repo_id)
        return "/cache/snapshot"

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    if weights:
        assert runner.input_value(x) == Path("/cache/snapshot")
    else:
        hub.pinned_snapshot(x["path"], x["revision"], weights=False)
    assert (asked["repo_id"], asked["revision"]) == (x["path"], x["revision"])
    return list(filter_repo_objects(META_REPO, allow_patterns=asked.get("allow_patterns"),
                                    ignore_patterns=asked.get("ignore_patterns")))


def test_a_pinned_model_is_fetched_without_metas_original_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    x = {"path": "meta-llama/Llama-3.1-405B-Instruct-FP8", "revision": PINNED}
    files = fetched(monkeypatch, x)
    assert not [f for f in files if f.startswith("original/")]
    assert set(files) >= {"config.json", "generation_config.json", "model.safetensors.index.json",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert sum(f.endswith(".safetensors") for f in files) == 109
    # the pre-round checks: config and tokenizer, no weights
    assert not [f for f in fetched(monkeypatch, x, weights=False) if f.endswith((".safetensors", ".pth"))]
    # every file save_pretrained writes (what from_pretrained reads back) passes the stages' filter
    tok = build_tokenizer()
    random_llama(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    written = [str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*") if p.is_file()]
    kept = filter_repo_objects(written, allow_patterns=hub.CONFIG_FILES + hub.WEIGHT_FILES,
                               ignore_patterns=hub.NEVER_LOADED)
    assert sorted(kept) == sorted(written), written


def test_ranks_fetch_one_at_a_time(monkeypatch, tmp_path):
    """Four ranks ask for the same pinned model at once (as under `accelerate launch`): the first to enter the
    fetch waits up to 2 s for a second to join it; with the lock none can, so at most one fetch ever runs."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    active, most, joined, lock = [0], [0], threading.Event(), threading.Lock()

    def snapshot_download(repo_id, **kw):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            if active[0] > 1:
                joined.set()
        joined.wait(timeout=2)
        with lock:
            active[0] -= 1
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    start = threading.Barrier(4)

    def rank():
        start.wait()
        runner.input_value({"path": "org/model", "revision": PINNED})

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
