"""Behaviour the trimming of alignment/ (6e45ea8..d25b769) had changed without meaning to, pinned to the old one."""

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


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
