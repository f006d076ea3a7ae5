"""A prompt mixture (prompts.sources): each round draws exactly each source's quota of num_prompts, seeded per
source; a source's capability reaches its rows' system prompt and verifiers; eval reports accuracy per capability.
Expected quotas are worked out by hand below, not with the code under test."""

import json
from collections import Counter
from pathlib import Path

import pytest
from test_generate import server  # noqa: F401  (the scripted teacher server)

from alignment.cli import main as align
from alignment.config import InputError, load_recipe
from alignment.prompts import read_prompts, write_jsonl
from alignment.inputs import stage_inputs
from alignment.round import stage_config
from alignment.runner import input_value
from alignment.stage_table import StageConfig
from alignment.stages import generate

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny.yaml")


def sources(tmp_path: Path) -> tuple[Path, Path]:
    """sums.jsonl: 30 arithmetic rows without a capability; words.jsonl: 10 rows, one naming its own."""
    sums = [{"prompt_id": f"s{i:02d}", "messages": [{"role": "user", "content": f"What is {i} + 1?"}],
             "answer": str(i + 1)} for i in range(30)]
    words = [{"prompt_id": f"w{i:02d}", "messages": [{"role": "user", "content": f"Ann has {i} pens, gets 2."}],
              "answer": str(i + 2), **({"capability": "chat"} if i == 9 else {})} for i in range(10)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / "sums.jsonl", sums)
    write_jsonl(tmp_path / "words.jsonl", words)
    return tmp_path / "sums.jsonl", tmp_path / "words.jsonl"


def mix(tmp_path: Path, *extra: str, words_quota: str = "count: 4, rounds: {2: {count: 0}}"):
    sums, words = sources(tmp_path)
    return load_recipe(TINY, [
        f"runs_dir={tmp_path / 'runs'}", "prompts.train_path=null", "prompts.num_prompts=12",
        f"prompts.sources=[{{source: {sums}, weight: 3}}, {{source: {{path: {words}, capability: word}}, "
        f"{words_quota}}}]", *extra])


@pytest.mark.parametrize("plan,num_prompts,expected", [
    ([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], 10, [5, 3, 2]),
    ([{"weight": 1}, {"weight": 1}, {"weight": 1}], 10, [4, 3, 3]),  # 3.33 each: the one left goes to the first
    ([{"weight": 1}, {"weight": 2}], 7, [2, 5]),  # 2.33 and 4.67: the larger remainder, not the first, gets it
    ([{"count": 4}, {"weight": 1}, {"weight": 2}], 10, [4, 2, 4]),  # counts first, then 6 by weight
    ([{"count": 3}, {"count": 7}], 10, [3, 7]),
])
def test_quotas_sum_to_num_prompts_by_largest_remainder(tmp_path, plan, num_prompts, expected):
    sums, _ = sources(tmp_path)
    written = ", ".join("{source: %s, %s: %s}" % (sums, *next(iter(q.items()))) for q in plan)
    recipe = load_recipe(TINY, ["prompts.train_path=null", f"prompts.num_prompts={num_prompts}",
                                f"prompts.sources=[{written}]"])
    assert recipe.prompts.quotas(1) == expected


def test_counts_that_cannot_make_num_prompts_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"round 1's counts sum to 14, more than prompts.num_prompts \(12\)"):
        mix(tmp_path, words_quota="count: 14").prompts.quotas(1)
    recipe = load_recipe(TINY, ["prompts.train_path=null", "prompts.num_prompts=12",
                                f"prompts.sources=[{{source: {sources(tmp_path)[0]}, count: 5}}]"])
    with pytest.raises(InputError, match="less than, with no weighted source for the rest of"):
        recipe.prompts.quotas(1)


def test_a_source_needs_one_quota_and_train_path_or_sources_not_both(tmp_path):
    sums, _ = sources(tmp_path)
    with pytest.raises(InputError, match="give exactly one of `weight` and `count`"):
        load_recipe(TINY, ["prompts.train_path=null", f"prompts.sources=[{{source: {sums}, weight: 1, count: 2}}]"])
    with pytest.raises(InputError, match="give exactly one of `train_path` .* set train_path: null"):
        load_recipe(TINY, [f"prompts.sources=[{{source: {sums}, weight: 1}}]"])


def drawn(recipe, tmp_path: Path, round_n: int, server_url: str) -> list[dict]:
    """generate of round n with the scripted teacher, its inputs as the runner hands them to the stage."""
    recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_validate({
        **recipe.teacher.model_dump(), "source": "path", "model_name_or_path": "teacher", "backend": "openai",
        "endpoints": [server_url], "retry_backoff_s": 0.01, "system_prompts": {
            "word": "Answer in words.", "default": "Be brief."}})})
    inputs = {k: [input_value(x) for x in v] if isinstance(v, list) else input_value(v)
              for k, v in stage_inputs(recipe, round_n, "generate").items()}
    out = tmp_path / f"generate-{round_n}"
    out.mkdir()
    result = generate.run(StageConfig("generate", stage_config(recipe, "generate")), inputs, out, round_n)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return result, rows


def test_each_round_draws_each_sources_quota_and_its_capability(tmp_path, server):  # noqa: F811
    recipe = mix(tmp_path)
    result, rows = drawn(recipe, tmp_path, 1, server)
    by_prompt = {r["prompt_id"]: r for r in rows}
    assert Counter(pid[0] for pid in by_prompt) == {"s": 8, "w": 4}  # 12 split 3 : (count 4)
    assert result.stats["prompts_by_source"] == {str(tmp_path / "sums.jsonl"): 8, str(tmp_path / "words.jsonl"): 4}
    # the words source's capability picked their system prompt; w09 names its own (chat: no system prompt of its
    # own here, so the default one), and the sums have none
    for pid, r in by_prompt.items():
        want = "Answer in words." if pid[0] == "w" and pid != "w09" else "Be brief."
        assert r["system_prompt"] == want, pid
    # round 2: the words source's per-round count of 0, so all 12 from the sums
    _, rows2 = drawn(recipe, tmp_path, 2, server)
    assert Counter(r["prompt_id"][0] for r in rows2 if r["sample_index"] == 0) == {"s": 12}


def test_a_source_added_at_the_end_leaves_the_others_draws_alone(tmp_path, server):  # noqa: F811
    """(the two runs' files are in different folders: the draw follows the sources' order, never their paths)"""
    before = {r["prompt_id"] for r in drawn(mix(tmp_path / "a", words_quota="count: 4"), tmp_path / "a", 1,
                                              server)[1]}
    extra = tmp_path / "extra.jsonl"
    write_jsonl(extra, [{"prompt_id": f"x{i}", "messages": [{"role": "user", "content": f"x {i}?"}]} for i in range(5)])
    recipe = mix(tmp_path / "b", "prompts.num_prompts=14", words_quota="count: 4")
    recipe.prompts.sources.append(recipe.prompts.sources[1].model_validate({"source": str(extra), "count": 2}))
    after = {r["prompt_id"] for r in drawn(recipe, tmp_path / "b", 1, server)[1]}
    assert {p for p in after if p[0] in "sw"} == before and sum(p[0] == "x" for p in after) == 2


def test_validate_checks_every_rounds_quota_against_its_source(tmp_path, capsys):
    sums, words = sources(tmp_path)
    write_jsonl(tmp_path / "held_out.jsonl", [{"prompt_id": "e0", "messages": [{"role": "user", "content": "?"}],
                                               "answer": "0"}])
    base = [f"runs_dir={tmp_path}", "prompts.train_path=null", "prompts.num_prompts=12", "rounds=3",
            f"prompts.eval_path={tmp_path / 'held_out.jsonl'}"]
    fits = f"prompts.sources=[{{source: {sums}, weight: 1}}, {{source: {words}, count: 2}}]"
    align(["validate", TINY, *base, fits])
    assert "error" not in capsys.readouterr().err
    # round 3 asks the 10-row words source for 11
    late = (f"prompts.sources=[{{source: {sums}, weight: 1}}, {{source: {words}, count: 2, "
            "rounds: {3: {count: 11}}}]")
    with pytest.raises(SystemExit):
        align(["validate", TINY, *base, late])
    err = capsys.readouterr().err
    assert f"{words} has 10 prompts; round 3's quota asks for 11" in err and "Traceback" not in err


def test_a_prompt_id_in_two_sources_is_named_with_both_places(tmp_path):
    sums, _ = sources(tmp_path)
    write_jsonl(tmp_path / "again.jsonl", [{"prompt_id": "x", "messages": [{"role": "user", "content": "?"}]},
                                           {"prompt_id": "s03", "messages": [{"role": "user", "content": "?"}]}])
    with pytest.raises(InputError, match=rf"{tmp_path / 'again.jsonl'}:2: prompt_id 's03' is also in {sums}:4"):
        read_prompts([sums, tmp_path / "again.jsonl"])


def test_a_sources_capability_fills_only_rows_without_one_and_keeps_ids(tmp_path):
    _, words = sources(tmp_path)
    plain, tagged = read_prompts(words), read_prompts({"path": str(words), "capability": "word"})
    assert [r["prompt_id"] for r in plain] == [r["prompt_id"] for r in tagged]
    assert [r.get("capability") for r in tagged] == ["word"] * 9 + ["chat"]
    assert [r.get("capability") for r in plain] == [None] * 9 + ["chat"]


def test_eval_gives_accuracy_per_capability_with_its_interval_when_the_held_out_set_mixes_them():
    from alignment.backends.base import Completion
    from alignment.stages import eval as eval_stage

    recipe = StageConfig("eval", stage_config(load_recipe(TINY), "eval"))
    # 5 math prompts (3 right), 2 word prompts (1 right), 1 without a capability (right)
    caps = ["math"] * 5 + ["word"] * 2 + [None]
    right = [True, True, True, False, False, True, False, True]
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": "?"}], "answer": "7",
             **({"capability": c} if c else {})} for i, c in enumerate(caps)]
    greedy = [Completion("3 + 4 = 7" if ok else "3 + 4 = 8", 6, "stop") for ok in right]
    metrics, _ = eval_stage.model_metrics(recipe, rows, "m", (greedy, None, {}), None)
    assert metrics["accuracy"] == 5 / 8
    assert (metrics["accuracy/math"], metrics["accuracy/word"], metrics["accuracy/default"]) == (3 / 5, 1 / 2, 1.0)
    # Wilson's 95% interval for 3 of 5, by its formula: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z, n, p = 1.959963984540054, 5, 0.6
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (
        1 + z * z / n)
    assert metrics["accuracy/math_ci"] == pytest.approx([centre - half, centre + half])
    one, _ = eval_stage.model_metrics(recipe, [{**r, "capability": "math"} for r in rows], "m", (greedy, None, {}),
                                      None)
    assert not any(k.startswith("accuracy/") for k in one)  # one capability: the overall figure says it all


def test_a_recipe_without_a_mixture_keeps_the_fingerprints_it_had():
    """The new keys (prompts.sources, a source's capability) stay out of the hashed configuration until used, so a
    run made before them is not stale after an upgrade: the prompts section hashes as these four keys did."""
    from alignment.manifest import hash_json

    section = load_recipe(TINY, ["prompts.eval_path={path: data/arithmetic/eval.jsonl, columns: {answer: solution}}"])
    dumped = stage_config(section, "generate")["prompts"]
    assert dumped == {"train_path": "data/arithmetic/train.jsonl", "num_prompts": 3000, "retry_failed": False,
                      "eval_path": {"path": "data/arithmetic/eval.jsonl", "dataset": None, "revision": None,
                                    "name": None, "split": None, "columns": dumped["eval_path"]["columns"]}}
    assert hash_json(stage_config(load_recipe(TINY), "generate")["prompts"]) == hash_json({
        "train_path": "data/arithmetic/train.jsonl", "eval_path": "data/arithmetic/eval.jsonl", "num_prompts": 3000,
        "retry_failed": False})
