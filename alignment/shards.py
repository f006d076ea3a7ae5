"""Append-only result shards: how a long generation survives a crash, a killed process or a dead server.

Each run of a stage appends one JSON line per finished request to a new `part-<n>.jsonl` in the shards folder,
flushed as it is written. A re-run reads every part first and skips the requests already there, so a failure
loses at most the requests in flight. A line cut short by a kill (always the last of its part) is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignment.config import InputError


def load_shards(folder: Path) -> dict[str, dict]:
    """request_id -> record, from every part in the folder."""
    done: dict[str, dict] = {}
    for part in sorted(folder.glob("part-*.jsonl")):
        lines = part.read_text().split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # the last line, with no newline after it: written when killed
                    continue
                raise InputError(f"{part}:{lineno}: not valid JSON in the middle of a shard; the shard is "
                                 "damaged, remove it to generate its requests again") from None
            done[record["request_id"]] = record
    return done


class ShardWriter:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"part-{len(list(folder.glob('part-*.jsonl'))):05d}.jsonl"
        self.file = open(self.path, "a")
        self.written = 0

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # on disk (in the OS) before the next request: a killed process keeps it
        self.written += 1

    def close(self) -> None:
        self.file.close()
        if self.written == 0:
            self.path.unlink()  # a run that finished nothing leaves no empty part behind

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
