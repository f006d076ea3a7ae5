"""The seeded code task (alignment/tasks/code.py): regenerable files, a held-out split that owns its problems, and
hidden tests that the sandboxed verifier decides: every reference solution passes, a non-answer passes nothing."""

import json
import subprocess
import sys
from pathlib import Path

from alignment.config import VerifierConfig
from alignment.tasks.code import draw_splits
from alignment.verifiers import verify

ROOT = Path(__file__).resolve().parents[1]


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data/code" / f"{split}.jsonl").read_text().splitlines()]


def test_the_committed_files_regenerate_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, "-m", "alignment.tasks.code", "--out", str(tmp_path), "--train", "200",
                    "--eval", "60", "--seed", "0"], check=True, capture_output=True, cwd=ROOT)
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / "data/code" / f"{split}.jsonl").read_bytes()
    assert draw_splits(1, 20, 5) != draw_splits(0, 20, 5)


def test_no_held_out_problem_is_asked_in_training_under_another_name():
    def body(r):  # the reference's body: family and parameters, without the drawn function name
        return r["solution"].split("\n", 1)[1]
    train, held_out = rows("train"), rows("eval")
    assert not {body(r) for r in train} & {body(r) for r in held_out}
    assert len({body(r) for r in held_out}) == len(held_out) and len({body(r) for r in train}) == len(train)
    # the tests are hidden: the prompt names the function and says what it does, never a test's values
    for r in held_out:
        assert r["entry_point"] in r["messages"][0]["content"] and r["tests"] not in r["messages"][0]["content"]


def test_every_reference_solution_passes_and_a_non_answer_passes_nothing():
    v = VerifierConfig(name="code", kind="code")
    problems = rows("eval") + rows("train")[:60]
    block = lambda code: f"```python\n{code}\n```"  # noqa: E731
    solved = verify([v], problems, [block(r["solution"]) for r in problems])["code"]
    assert solved == [1.0] * len(problems)
    stubs = [block(f"def {r['entry_point']}(*args):\n    return None") for r in problems]
    assert verify([v], problems, stubs)["code"] == [0.0] * len(problems)
