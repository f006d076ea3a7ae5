"""Prompt files: JSONL, one conversation to answer per line, each with a unique `prompt_id`.

    {"prompt_id": "arith-train-00000", "messages": [{"role": "user", "content": "What is 2 + 80?"}], "answer": "82"}

`answer` is needed only when a verifier scores the task; `capability` (optional, e.g. "math", "code") picks the
teacher's system prompt from the recipe's `teacher.system_prompts`. Every problem is reported with its file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignment.chat import ROLES
from alignment.config import InputError


def read_prompts(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt file " + ("is a folder; expected a JSONL file" if path.is_dir()
                                                    else "does not exist"))
    rows, seen = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON: {e.msg}") from None
            except RecursionError:
                raise InputError(f"{where}: JSON nested too deeply") from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object")
            pid = row.get("prompt_id")
            if not isinstance(pid, str) or not pid.strip():
                raise InputError(f"{where}: missing prompt_id (a non-empty string)")
            if pid in seen:
                raise InputError(f"{where}: duplicate prompt_id {pid!r} (first on line {seen[pid]})")
            seen[pid] = lineno
            messages = row.get("messages")
            if not isinstance(messages, list) or not messages:
                raise InputError(f"{where}: prompt {pid!r}: messages must be a non-empty list")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise InputError(f"{where}: prompt {pid!r}: messages[{i}].role must be one of {ROLES}")
                if not isinstance(m.get("content"), str) or not m["content"].strip():
                    raise InputError(f"{where}: prompt {pid!r}: messages[{i}].content is empty")
            if messages[-1]["role"] == "assistant":
                raise InputError(f"{where}: prompt {pid!r}: the last message must not be the assistant's")
            if "capability" in row and not (isinstance(row["capability"], str) and row["capability"].strip()):
                raise InputError(f"{where}: prompt {pid!r}: capability must be a non-empty string (it picks the "
                                 "teacher's system prompt)")
            for key in ("answer", "tests"):  # verifiers read strings: a JSON number would go silently unscored
                if key in row and not isinstance(row[key], str):
                    raise InputError(f"{where}: prompt {pid!r}: {key} must be a string, got "
                                     f"{type(row[key]).__name__} {json.dumps(row[key])[:40]}")
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: prompt file has no rows")
    return rows


def content_key(messages: list[dict]) -> str:
    """A conversation as text with case and spacing normalised: the same question under another id matches."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].lower().split())}" for m in messages)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n
