import json

import pytest

from alignment.config import InputError
from alignment.prompts import read_prompts

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
