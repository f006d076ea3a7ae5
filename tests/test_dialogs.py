"""Multi-turn rollouts (the dialogs stage): each selected answer's dialog goes on with the prompt row's next user
turn, the teacher answers K times, and each turn is scored and selected as its own example with the whole dialog
before it. The teacher is a scripted OpenAI-compatible server that answers by the last user message, so every
expected count below follows from the script and the arithmetic verifier, not from the code under test."""

import json
from pathlib import Path

import pytest
from test_generate import Scripted, server  # noqa: F401  (the scripted teacher server and its fixture)
from test_revise import stage

from alignment.config import InputError, load_recipe
from alignment.prompts import read_jsonl, read_prompts, write_jsonl
from alignment.stage_table import round_stages
from alignment.stages import dialogs

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny.yaml")

PROMPTS = [
    {"prompt_id": "p1", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5",
     "followups": [{"content": "Add 4 to that.", "answer": "9"}, {"content": "Now double it.", "answer": "18"}]},
    {"prompt_id": "p2", "messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2",
     "followups": [{"content": "Add 1.", "answer": "3"}]},
    {"prompt_id": "p3", "messages": [{"role": "user", "content": "What is 7 + 0?"}], "answer": "7",
     "followups": ["Add 1."]},  # turn 1 chose nothing for p3: its dialog never goes on
]
# turn 1 as select left it: p1 and p2 chosen, p3 not
TURN1 = [{"prompt_id": p, "sample_index": 0, "prompt": [m], "completion": [{"role": "assistant", "content": a}],
          "reward": 1.0, "scores": {}}
         for p, m, a in (("p1", PROMPTS[0]["messages"][0], "2 + 3 = 5"), ("p2", PROMPTS[1]["messages"][0], "1 + 1 = 2"))]
# the scripted teacher, by the last user message: sample 0 and sample 1
ANSWERS = {"Add 4 to that.": ("5 + 4 = 9", "5 + 4 = 10"), "Now double it.": ("9 * 2 = 18", "9 * 2 = 17"),
           "Add 1.": ("2 + 1 = 4", "2 + 1 = 5")}


def setup(tmp_path: Path, endpoint: str, *extra: str):
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    write_jsonl(tmp_path / "turn1.jsonl", TURN1)
    recipe = load_recipe(TINY, [
        f"runs_dir={tmp_path / 'runs'}", f"prompts.train_path={tmp_path / 'prompts.jsonl'}", "sampling.num_samples=2",
        f"teacher={{source: path, model_name_or_path: teacher, backend: openai, endpoints: ['{endpoint}'], "
        "retry_backoff_s: 0.01, max_retries: 0, system_prompts: {}}", "dialogs={turns: 4}", *extra])
    Scripted.text = staticmethod(lambda body, i: ANSWERS[body["messages"][-1]["content"]][i])
    Scripted.hits_limit = staticmethod(lambda body, i: False)
    return recipe, {"sft": tmp_path / "turn1.jsonl", "prompts": tmp_path / "prompts.jsonl", "teacher": "teacher"}


def test_each_later_turn_is_selected_with_the_dialog_before_it(server, tmp_path):
    recipe, inputs = setup(tmp_path, server)
    names = [s.name for s in round_stages(recipe, 1)]
    assert names.index("select") < names.index("dialogs") < names.index("sft")
    out = tmp_path / "dialogs"
    out.mkdir()
    result = dialogs.run(stage(recipe, "dialogs"), inputs, out, 1)

    # by hand: turn 2 continues p1 and p2; p1's sample 0 is right (SFT row, and a pair with its wrong sample 1),
    # both of p2's are wrong (nothing chosen: p2 ends). Turn 3 continues p1 alone, right again. Turn 4: p1 has no
    # third follow-up, so the stage stops. Requests: 2 in turn 2, 1 in turn 3.
    assert result.stats["per_turn"]["2"] | {"verified": None, "prompt_tokens": None} == {
        "dialogs": 2, "sft": 1, "pairs": 1, "verified": None, "hit_token_limit": 0, "prompt_tokens": None}
    assert result.stats["per_turn"]["2"]["verified"] == {"passed": 1, "failed": 3}  # of 4 samples, only p1's 0
    assert {k: result.stats["per_turn"]["3"][k] for k in ("dialogs", "sft", "pairs")} == {"dialogs": 1, "sft": 1,
                                                                                        "pairs": 1}
    assert "4" not in result.stats["per_turn"]
    assert result.stats["dialog_ended"] == {"no_chosen_response": 1, "no_next_user_turn": 1}
    assert result.stats["assistant_turns_per_dialog"]["mean"] == 2.0  # p1 reached 3 turns, p2 stayed at 1
    assert len(Scripted.seen) == 3

    sft = read_jsonl(out / "sft.jsonl")
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    assert [(r["prompt_id"], r["turn"], r["prompt"], r["completion"]) for r in sft] == [
        ("p1#turn-2", 2, [u("What is 2 + 3?"), a("2 + 3 = 5"), u("Add 4 to that.")], [a("5 + 4 = 9")]),
        ("p1#turn-3", 3, [u("What is 2 + 3?"), a("2 + 3 = 5"), u("Add 4 to that."), a("5 + 4 = 9"),
                          u("Now double it.")], [a("9 * 2 = 18")])]
    pairs = read_jsonl(out / "pairs.jsonl")
    assert [(r["prompt_id"], r["chosen"], r["rejected"]) for r in pairs] == [
        ("p1#turn-2", [a("5 + 4 = 9")], [a("5 + 4 = 10")]), ("p1#turn-3", [a("9 * 2 = 18")], [a("9 * 2 = 17")])]

    # a second run resumes every request from the shards: nothing sent, the same bytes
    before, Scripted.seen = (out / "sft.jsonl").read_bytes(), []
    dialogs.run(stage(recipe, "dialogs"), inputs, out, 1)
    assert Scripted.seen == [] and (out / "sft.jsonl").read_bytes() == before


def test_a_turn_that_fails_midway_resumes_with_only_its_unsent_requests(server, tmp_path):
    recipe, inputs = setup(tmp_path, server)
    out = tmp_path / "dialogs"
    out.mkdir()
    Scripted.script = ["ok", "ok", 400]  # turn 2's two requests answer, turn 3's is refused
    with pytest.raises(Exception, match="HTTP 400"):
        dialogs.run(stage(recipe, "dialogs"), inputs, out, 1)
    Scripted.seen = []
    result = dialogs.run(stage(recipe, "dialogs"), inputs, out, 1)
    assert [b["messages"][-1]["content"] for _, b in Scripted.seen] == ["Now double it."]  # turn 3 alone is sent
    assert result.rows == {"dialogs": 2, "sft": 2, "pairs": 2}


def test_the_sft_and_dpo_stages_read_the_later_turns(server, tmp_path):
    from alignment.stage_table import STAGES, Upstream

    for accumulate, sft_rounds, dpo_rounds in ((["sft.accumulate=0", "dpo.accumulate=0"], [3], [3]),
                                               (["sft.accumulate=all", "dpo.accumulate=1"], [3, 2, 1], [3, 2])):
        recipe, _ = setup(tmp_path, server, *accumulate)
        assert STAGES["sft"].inputs(recipe, 3)["dialogs_sft"] == [
            Upstream("dialogs", "sft", k, f"sft: dialogs (round {k})") for k in sft_rounds]
        assert STAGES["dpo"].inputs(recipe, 3)["dialogs_pairs"] == [
            Upstream("dialogs", "pairs", k, f"dpo: dialogs (round {k})") for k in dpo_rounds]
    on_policy, _ = setup(tmp_path, server, "dpo.pairs_from=policy")  # the policy's own pairs are single-turn
    assert "dialogs_pairs" not in STAGES["dpo"].inputs(on_policy, 1)
    plain = load_recipe(TINY, [])  # no dialogs section: no stage, no new inputs (fingerprints as before)
    assert "dialogs_sft" not in STAGES["sft"].inputs(plain, 2) and "dialogs" not in [
        s.name for s in round_stages(plain, 1)]


def test_followups_are_checked_where_they_are_written(tmp_path):
    for bad, message in (("Add 1.", "followups must be a list of next user turns, got str"),
                         ([{"content": ""}], r"followups\[0\]: a non-empty string, or an object"),
                         ([{"content": "x", "answer": 3}], r"followups\[0\].answer must be a string, got int"),
                         ([{"content": "x", "hint": "y"}], r"followups\[0\]: unknown keys \['hint'\]")):
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps({**PROMPTS[0], "followups": bad}) + "\n")
        with pytest.raises(InputError, match=rf"p.jsonl:1: prompt 'p1': {message}"):
            read_prompts(path)


def test_a_simulator_prompt_without_its_field_is_refused():
    with pytest.raises(InputError, match=r"dialogs.simulator_prompt: must hold \{dialog\}"):
        load_recipe(TINY, ["dialogs={turns: 2, user: simulator, simulator_prompt: 'Go on.'}"])


def test_a_simulated_user_writes_the_next_turn(server, tmp_path):
    """`user: simulator`: the teacher is asked for the user's next message with the dialog as text; an empty reply
    ends that dialog. By hand: p1's dialog gets "Add 4 to that.", p2's gets nothing."""
    recipe, inputs = setup(tmp_path, server, "dialogs={turns: 2, user: simulator}", "select.sft_min_reward=0.0")

    def text(body, i):
        ask = body["messages"][-1]["content"]
        if ask.startswith("Here is a conversation"):
            return "Add 4 to that." if "2 + 3 = 5" in ask else "  "
        return ANSWERS[ask][i]

    Scripted.text = staticmethod(text)
    out = tmp_path / "dialogs"
    out.mkdir()
    result = dialogs.run(stage(recipe, "dialogs"), inputs, out, 1)
    asks = [b for _, b in Scripted.seen if b["messages"][-1]["content"].startswith("Here is a conversation")]
    assert len(asks) == 2 and all(b["n"] == 1 for b in asks)
    assert "user: What is 2 + 3?\n\nassistant: 2 + 3 = 5" in asks[0]["messages"][0]["content"] + \
        asks[1]["messages"][0]["content"]
    assert result.stats["dialog_ended"] == {"no_next_user_turn": 1}
    sft = read_jsonl(out / "sft.jsonl")
    assert [(r["prompt_id"], r["prompt"][-1]["content"], r["completion"][0]["content"]) for r in sft] == [
        ("p1#turn-2", "Add 4 to that.", "5 + 4 = 9")]


def test_the_dialog_prompt_files_regenerate_and_each_turn_s_answer_follows_from_the_last(tmp_path):
    """`make data` writes data/arithmetic_dialogs byte for byte; each follow-up's answer is the previous answer
    changed as its words say, worked out here from the text alone."""
    import re

    from alignment.tasks.arithmetic import write_prompt_files

    write_prompt_files(tmp_path, 2000, 100, 0, "plain", 2)
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / f"data/arithmetic_dialogs/{split}.jsonl").read_bytes()
    rows = read_jsonl(ROOT / "data/arithmetic_dialogs/train.jsonl")
    for row in rows:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", row["messages"][0]["content"]).groups()
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert row["answer"] == str(value) and len(row["followups"]) == 2
        for f in row["followups"]:
            verb, c = re.fullmatch(r"(Add|Subtract) (\d+) (?:to|from) that\.", f["content"]).groups()
            value += int(c) if verb == "Add" else -int(c)
            assert f["answer"] == str(value)
    # the problems are new draws of the same generator: the held-out split shares no question with training
    train = {r["messages"][0]["content"] for r in rows}
    assert not train & {r["messages"][0]["content"] for r in read_jsonl(ROOT / "data/arithmetic_dialogs/eval.jsonl")}


def test_dialogs_over_prompts_without_followups_is_refused_before_any_work(tmp_path, capsys):
    from alignment.cli import main

    with pytest.raises(SystemExit):
        main(["round", "1", "--recipe", TINY, f"runs_dir={tmp_path}", "dialogs={turns: 2}"])
    err = capsys.readouterr().err
    assert "dialogs.user is followups, but no prompt of data/arithmetic/train.jsonl has `followups`" in err
    assert list(tmp_path.iterdir()) == []  # nothing was started
    main(["validate", TINY, "dialogs={turns: 2}", "prompts.train_path=data/arithmetic_dialogs/train.jsonl",
          "prompts.eval_path=data/arithmetic_dialogs/eval.jsonl"])
    assert ": ok (recipe" in capsys.readouterr().out


def test_a_dialog_that_would_outgrow_the_teacher_s_context_ends_there(server, tmp_path):
    """The teacher's context, from its own config: a tiny model of 100 positions holds turn 2 of p1 (83 prompt
    tokens) and of p2 (75) with 16 new tokens, and not p1's turn 3 (129); counted by the template here."""
    from alignment.chat import build_tokenizer, token_ids
    from alignment.tiny_models import random_llama, save

    tok = build_tokenizer()
    turn3 = [PROMPTS[0]["messages"][0], {"role": "assistant", "content": "2 + 3 = 5"},
             {"role": "user", "content": "Add 4 to that."}, {"role": "assistant", "content": "5 + 4 = 9"},
             {"role": "user", "content": "Now double it."}]
    assert len(token_ids(tok, turn3[:3], add_generation_prompt=True)) + 16 <= 100 < \
        len(token_ids(tok, turn3, add_generation_prompt=True)) + 16
    folder = save(random_llama(tok, seed=0, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=100), tok, tmp_path / "teacher")
    recipe, inputs = setup(tmp_path, server, f"teacher.model_name_or_path={folder}", "sampling.max_new_tokens=16")
    Scripted.models = [str(folder)]
    # a local teacher folder: the backend decodes the answers' token ids, which must then be the text's (and the end)
    Scripted.token_ids = staticmethod(lambda body, i: tok(Scripted.text(body, i) + "<|eot_id|>",
                                                           add_special_tokens=False).input_ids)
    out = tmp_path / "dialogs"
    out.mkdir()
    result = dialogs.run(stage(recipe, "dialogs"), {**inputs, "teacher": folder}, out, 1)
    assert result.stats["dialog_ended"] == {"no_chosen_response": 1, "at_context_limit": 1}
    assert [r["prompt_id"] for r in read_jsonl(out / "sft.jsonl")] == ["p1#turn-2"]
