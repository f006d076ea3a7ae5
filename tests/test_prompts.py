import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.config import InputError
from alignment.prompts import read_prompts

ROOT = Path(__file__).resolve().parents[1]

GOOD = {"prompt_id": "a", "messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}


def write(tmp_path, rows):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("bad,line,message", [
    ({"messages": GOOD["messages"]}, 2, "missing prompt_id"),
    ({**GOOD, "prompt_id": ""}, 2, "missing prompt_id"),
    ({**GOOD}, 2, "duplicate prompt_id 'a' (first at {p}:1)"),
    ({**GOOD, "prompt_id": "b", "messages": []}, 2, "messages must be a non-empty list"),
    ({**GOOD, "prompt_id": "b", "messages": [{"role": "user", "content": "  "}]}, 2, "messages[0].content is empty"),
    ({**GOOD, "prompt_id": "b", "messages": [{"role": "robot", "content": "hi"}]}, 2, "messages[0].role"),
    ("{not json", 2, "not valid JSON"),
])
def test_bad_rows_are_rejected_with_their_line(tmp_path, bad, line, message):
    p = write(tmp_path, [GOOD, bad])
    with pytest.raises(InputError) as e:
        read_prompts(p)
    assert str(e.value).startswith(f"{p}:{line}: ") and message.format(p=p) in str(e.value)


def test_shipped_splits_are_disjoint_by_question():
    train = read_prompts("data/arithmetic/train.jsonl")
    held_out = read_prompts("data/arithmetic/eval.jsonl")
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held_out}


def test_the_word_problems_regenerate_byte_for_byte_and_hold_out_their_sums(tmp_path):
    import re

    from alignment.tasks.arithmetic import write_prompt_files

    write_prompt_files(tmp_path, 2000, 200, 0, "word")
    for split in ("train", "eval"):  # `make data` rewrites the committed files exactly
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / f"data/word_problems/{split}.jsonl").read_bytes()

    def sums(split):  # read back from the text, not from the generator
        out, rows = set(), read_prompts(ROOT / f"data/word_problems/{split}.jsonl")
        for row in rows:
            a, verb, b = re.match(r"\w+ has (\d+) \w+ and (gets|gives) (\d+)", row["messages"][0]["content"]).groups()
            a, b = int(a), int(b)
            assert int(row["answer"]) == (a + b if verb == "gets" else a - b) >= 0
            out.add((a, verb, b))
        return out, len(rows)

    (held_out, n_eval), (train, _) = sums("eval"), sums("train")
    assert not train & held_out
    # every held-out row is its own problem: intervals over the rows treat them as independent
    assert len(held_out) == n_eval == 200


def test_the_prompt_file_generator_imports_no_ml_library():
    """`make data` runs `python -m alignment.tasks.arithmetic`: standard library only, so it starts in ~0.03 s
    rather than the ~1 s transformers' import costs (through alignment.prompts -> alignment.chat)."""
    code = ("import sys, tempfile, alignment.tasks.arithmetic as a; a.write_prompt_files(__import__('pathlib')"
            ".Path(tempfile.mkdtemp()), 3, 2, 0, 'plain'); print(sorted({'transformers', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
