"""SFT data beyond this round's rejection sampling: rows of earlier rounds (`sft.accumulate`, deduplicated by
content, the newest kept) and extra conversation files with epochs (`sft.extra_sources`). Expected rows are worked
out by hand from the files written here."""

import json
from pathlib import Path

import pytest

from alignment.config import InputError, load_recipe
from alignment.prompts import write_jsonl
from alignment.inputs import identity
from alignment.stage_table import STAGES, File, Upstream
from alignment.stages.sft import assemble

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny.yaml")


def row(q: str, a: str) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}


def test_earlier_rounds_are_added_once_and_extra_sources_by_their_epochs(tmp_path):
    write_jsonl(tmp_path / "r3.jsonl", [row("1+1", "2"), row("2+2", "4")])
    write_jsonl(tmp_path / "r2.jsonl", [{**row("2+2", "4"), "reward": 0.5}, row("3+3", "6")])  # 2+2 again
    write_jsonl(tmp_path / "r1.jsonl", [row("1+1", "two")])  # same prompt, another answer: a different row
    curated = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(4)]
    write_jsonl(tmp_path / "curated.jsonl", curated)
    write_jsonl(tmp_path / "pc.jsonl", [row("x", "y")])
    cfg = load_recipe(TINY, ["sft.accumulate=all", f"sft.extra_sources=[{{path: {tmp_path / 'curated.jsonl'}, "
                             f"epochs: 1.5}}, {{path: {tmp_path / 'pc.jsonl'}, epochs: 2}}]"]).sft
    inputs = {"sft": tmp_path / "r3.jsonl", "earlier_sft": [tmp_path / "r2.jsonl", tmp_path / "r1.jsonl"],
              "extra_sft": [tmp_path / "curated.jsonl", tmp_path / "pc.jsonl"]}
    rows, sources = assemble(cfg, inputs, seed=0, round_n=3)
    # by hand: round 3 both rows; round 2 only 3+3 (2+2 repeats round 3's); round 1 its row (another answer);
    # curated: 4 rows once and round(0.5 * 4) = 2 of them again; pc: its row twice
    texts = [(r["prompt"][-1]["content"], r["completion"][0]["content"]) for r in rows]
    assert texts[:4] == [("1+1", "2"), ("2+2", "4"), ("3+3", "6"), ("1+1", "two")]
    assert texts[4:8] == [(f"q{i}", f"a{i}") for i in range(4)]
    assert len(set(texts[8:10])) == 2 and set(texts[8:10]) <= set(texts[4:8]) and texts[10:] == [("x", "y")] * 2
    assert sources == {"round 3": {"rows": 2}, "round 2": {"rows": 1}, "round 1": {"rows": 1},
                       str(tmp_path / "curated.jsonl"): {"rows": 4, "epochs": 1.5, "used": 6},
                       str(tmp_path / "pc.jsonl"): {"rows": 1, "epochs": 2.0, "used": 2}}
    # seeded: the same half again for the same seed and round
    assert assemble(cfg, inputs, seed=0, round_n=3)[0] == rows


def test_which_rounds_accumulate_and_that_the_default_reads_only_its_own():
    def rounds(accumulate, n):
        inputs = STAGES["sft"].inputs(load_recipe(TINY, [f"sft.accumulate={accumulate}"]), n)
        return [u.round for u in inputs.get("earlier_sft", [])]
    assert rounds(0, 4) == [] and rounds(2, 4) == [3, 2] and rounds(2, 2) == [1] and rounds("all", 4) == [3, 2, 1]
    assert rounds("all", 1) == [] and rounds(9, 3) == [2, 1]
    default = STAGES["sft"].inputs(load_recipe(TINY), 2)  # no new keys: older runs keep their fingerprints
    assert set(default) == {"model", "sft"} and default["sft"] == Upstream("select", "sft", 2, "sft")
    with pytest.raises(InputError, match="sft.accumulate"):
        load_recipe(TINY, ["sft.accumulate=-1"])


def test_an_extra_source_is_hashed_by_content_and_a_bad_row_is_named(tmp_path):
    path = tmp_path / "extra.jsonl"
    write_jsonl(path, [row("q", "a")])
    recipe = load_recipe(TINY, [f"sft.extra_sources=[{{path: {path}}}]"])
    (spec,) = STAGES["sft"].inputs(recipe, 1)["extra_sft"]
    before = identity(recipe, spec)["hash"]
    write_jsonl(path, [row("q", "b")])
    assert identity(recipe, spec)["hash"] != before and spec == File(path, "sft.extra_sources")
    for bad, message in (([1, 2], "row 1: a JSON object"),
                         ({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "a"}]},
                          "row 1: prompt: a message needs a role .* and a string content")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(InputError, match=message):
            assemble(recipe.sft, {"sft": _empty(tmp_path), "extra_sft": [path]}, 0, 1)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    cfg = recipe.sft
    with pytest.raises(InputError, match=r"extra.jsonl: row 1: messages must be a list of messages ending in the "
                                         r"assistant's"):
        assemble(cfg, {"sft": _empty(tmp_path), "extra_sft": [path]}, 0, 1)


def _empty(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "none.jsonl", [])
    return tmp_path / "none.jsonl"


def pair(q: str, good: str, bad: str, **extra) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}], **extra}


def test_dpo_adds_the_last_k_rounds_pairs_once_and_preference_files_by_strength(tmp_path):
    from alignment.stages.dpo import assemble as dpo_assemble

    write_jsonl(tmp_path / "p3.jsonl", [pair("a", "1", "2")])
    write_jsonl(tmp_path / "p2.jsonl", [pair("a", "1", "2"), pair("b", "3", "4")])  # a repeats round 3's
    write_jsonl(tmp_path / "human.jsonl", [pair("h1", "x", "y", strength=3), pair("h2", "x", "y", strength=1),
                                           pair("h3", "x", "y", strength=2)])
    cfg = load_recipe(TINY, ["dpo.accumulate=1", f"dpo.preference_sources=[{{path: {tmp_path / 'human.jsonl'}, "
                             "min_strength: 2}]"]).dpo
    rows, sources = dpo_assemble(cfg, {"pairs": tmp_path / "p3.jsonl", "earlier_pairs": [tmp_path / "p2.jsonl"],
                                       "preferences": [tmp_path / "human.jsonl"]}, 3)
    # by hand: round 3's a; round 2's b (a repeats); the human file's strengths 3 and 2 reach 2, 1 does not
    assert [r["prompt"][0]["content"] for r in rows] == ["a", "b", "h1", "h3"]
    assert sources == {"round 3": {"rows": 1}, "round 2": {"rows": 1},
                       str(tmp_path / "human.jsonl"): {"rows": 3, "kept": 2}}
    # the inputs: only the last k rounds, and none by default
    recipe = load_recipe(TINY, ["dpo.accumulate=2"])
    assert [u.round for u in STAGES["dpo"].inputs(recipe, 4)["earlier_pairs"]] == [3, 2]
    assert set(STAGES["dpo"].inputs(load_recipe(TINY), 4)) == {"model", "pairs"}
    # a filter on strength needs a strength in every row: named, not silently kept or dropped
    write_jsonl(tmp_path / "human.jsonl", [pair("h1", "x", "y", strength=3), pair("h2", "x", "y")])
    with pytest.raises(InputError, match=r"human.jsonl: row 2: no numeric `strength`"):
        dpo_assemble(cfg, {"pairs": tmp_path / "p3.jsonl", "preferences": [tmp_path / "human.jsonl"]}, 1)


def test_a_prompt_too_long_is_named_by_the_file_and_row_it_came_from(tmp_path):
    # this round's one short row, then an extra source whose second row is far longer than max_length: the error
    # names that file and its row 2, not this round's file or a position in the assembled list
    from alignment.chat import build_tokenizer
    from alignment.training import check_prompts_fit

    write_jsonl(tmp_path / "r1.jsonl", [row("1+1", "2")])
    write_jsonl(tmp_path / "extra.jsonl", [row("2+2", "4"), row("9" * 400, "9")])
    cfg = load_recipe(TINY, [f"sft.extra_sources=[{{path: {tmp_path / 'extra.jsonl'}}}]"]).sft
    rows, _ = assemble(cfg, {"sft": tmp_path / "r1.jsonl", "extra_sft": [tmp_path / "extra.jsonl"]}, 0, 1)
    with pytest.raises(InputError, match=r"of 3 rows of .*extra.jsonl \(row 2: 4\d\d tokens"):
        check_prompts_fit(build_tokenizer(), rows, 128, "sft.max_length", tmp_path / "r1.jsonl")


def capped(cap: str | None, i: int) -> dict:
    return {**row(f"{cap}-{i}", "a"), **({"capability": cap} if cap else {})}


def test_balance_keeps_each_capability_at_its_share_of_what_the_scarcest_allows(tmp_path):
    from alignment.stages.sft import balance

    cfg = load_recipe(TINY, ["sft.balance={shares: {math: 3, chat: 2}}"]).sft.balance  # 0.6 and 0.4
    rows = [capped("math", i) for i in range(10)] + [capped("chat", i) for i in range(4)]
    # by hand: N = min(10 / 0.6, 4 / 0.4) = 10 -> math keeps 6 of its 10, chat all 4: exactly 0.6 / 0.4
    kept, stats = balance(rows, cfg, 0, 1)
    assert [sum(r["capability"] == c for r in kept) for c in ("math", "chat")] == [6, 4]
    assert stats["per_capability"] == {"math": {"rows": 10, "kept": 6, "target": 0.6, "share": 0.6},
                                       "chat": {"rows": 4, "kept": 4, "target": 0.4, "share": 0.4}}
    assert stats["max_deviation"] == 0.0 and (stats["rows_before"], stats["rows_after"]) == (14, 10)
    assert balance(rows, cfg, 0, 1)[0] == kept and balance(rows, cfg, 1, 1)[0] != kept  # seeded by seed and round
    # a row without a capability counts as `default`, which then needs a share of its own
    with pytest.raises(InputError, match="sft.balance.shares: SFT rows of capability 'default' \\(1 rows\\) have "
                                         "no share"):
        balance(rows + [capped(None, 0)], cfg, 0, 1)
    with pytest.raises(InputError, match="capability 'chat' has a share but no SFT rows this round"):
        balance(rows[:10], cfg, 0, 1)


def test_balance_refuses_a_mix_the_rows_cannot_meet_within_the_tolerance(tmp_path):
    from alignment.stages.sft import balance

    cfg = load_recipe(TINY, ["sft.balance={shares: {math: 0.7, chat: 0.3}, tolerance: 0.05}"]).sft.balance
    # by hand: one row each. N = min(1 / 0.7, 1 / 0.3) = 1.43 -> math keeps floor(1.0) = 1, chat floor(0.43) = 0:
    # both end 0.3 from their targets (math at 1.0, chat at 0), past 0.05; the first listed is named
    with pytest.raises(InputError, match=r"sft.balance: capability 'math' ends at 1.000 of the 1 kept rows, 0.300 "
                                         r"from its share 0.700 \(tolerance 0.05\)"):
        balance([capped("math", 0), capped("chat", 0)], cfg, 0, 1)


def test_an_extra_source_s_rows_carry_its_capability_into_the_balance(tmp_path):
    write_jsonl(tmp_path / "sel.jsonl", [capped("math", i) for i in range(3)])
    write_jsonl(tmp_path / "curated.jsonl", [row(f"c{i}", "a") for i in range(5)])
    recipe = load_recipe(TINY, [f"sft.extra_sources=[{{path: {tmp_path / 'curated.jsonl'}, capability: chat}}]"])
    rows, _ = assemble(recipe.sft, {"sft": tmp_path / "sel.jsonl", "extra_sft": [tmp_path / "curated.jsonl"]}, 0, 1)
    assert [r.get("capability") for r in rows] == ["math"] * 3 + ["chat"] * 5
    plain = load_recipe(TINY, [f"sft.extra_sources=[{{path: {tmp_path / 'curated.jsonl'}}}]"])
    assert "capability" not in plain.model_dump(mode="json")["sft"]["extra_sources"][0]  # fingerprints as before
    assert "balance" not in plain.model_dump(mode="json")["sft"]
