"""Behaviour the trimming of alignment/ (6e45ea8..d25b769) had changed without meaning to, pinned to the old one."""

import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from alignment.config import load_recipe
from alignment.memory_plan import plan
from hub_configs import write_hub_cache

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ("bootstrap={task: arithmetic, hidden_size: 64, intermediate_size: 256, num_hidden_layers: 2, "
             "num_attention_heads: 2, max_position_embeddings: 256, batch_size: 128, learning_rate: 0.003, "
             "student_accuracy: 0.08, teacher_accuracy: 0.85, max_steps: 3000}")


def test_the_prompt_file_generator_imports_no_ml_library():
    """`make data` runs `python -m alignment.tasks.arithmetic`: standard library only, so it starts in ~0.03 s
    rather than the ~1 s transformers' import costs (through alignment.prompts -> alignment.chat)."""
    code = ("import sys, tempfile, alignment.tasks.arithmetic as a; a.write_prompt_files(__import__('pathlib')"
            ".Path(tempfile.mkdtemp()), 3, 2, 0, 'plain'); print(sorted({'transformers', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_writing_prompt_files_still_writes_them(tmp_path):
    from alignment.tasks.arithmetic import write_prompt_files

    write_prompt_files(tmp_path, 5, 3, 0, "plain")
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 5
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 3


def test_a_best_teacher_without_a_named_model_is_planned_as_the_student(tmp_path, monkeypatch):
    """teacher.source best without model_name_or_path starts as the bootstrap's (tiny) teacher, but from round 2 it
    is the best model so far, which may be a promoted student: the plan sizes the teacher's rows by the student (an
    8B here), as it did before, not by the tiny bootstrap teacher (which would say 0.0 GiB and let an 8B OOM)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(write_hub_cache(tmp_path / "hub")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["teacher.model_name_or_path=null", "teacher.engine.quantization=null", BOOTSTRAP]
    best = {r.stage: r for r in plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["teacher.source=best", *base]))}
    previous = {r.stage: r for r in plan(load_recipe(ROOT / "recipes/llama3.1-8b.yaml",
                                                     ["teacher.source=previous", *base]))}
    assert best["generate"].holds == previous["generate"].holds  # the 8B student's weights
    assert best["generate"].holds["weights /8"] > 1 * 2**30
