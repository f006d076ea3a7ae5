"""Execution feedback (the revise stage): failing code samples go back to the teacher with their error, for up to
max_turns revision turns; revisions resume from shards, are scored like samples, and become SFT rows and DPO pairs
in select. The teacher is a scripted OpenAI-compatible server that answers by what the conversation holds, so
every expected count below follows from the script, not from the code under test."""

import json
from pathlib import Path

import pytest
from test_generate import Scripted, server  # noqa: F401  (the scripted teacher server and its fixture)

from alignment.config import load_recipe
from alignment.prompts import read_jsonl, write_jsonl
from alignment.stage_table import StageConfig, round_stages
from alignment.stages import revise, score, select

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny.yaml")

TESTS = {"add": "assert add(1, 2) == 3\nassert add(-1, 1) == 0",
         "mul": "assert mul(2, 3) == 6",
         "neg": "assert neg(4) == -4\nassert neg(0) == 0"}
RIGHT = {"add": "def add(a, b):\n    return a + b", "mul": "def mul(a, b):\n    return a * b",
         "neg": "def neg(x):\n    return -x"}
WRONG = {"add": "def add(a, b):\n    return a - b", "mul": "def mul(a, b):\n    return a + b",
         "neg": "def neg(x):\n    return x"}
# add's first revision crashes, printing to stderr first: the second turn must be shown both
CRASH = "import sys\nprint('tracing add', file=sys.stderr)\ndef add(a, b):\n    return a / 0"


def block(code: str) -> str:
    return f"Here is the code.\n```python\n{code}\n```"


def teacher_answer(body: dict, i: int) -> str:
    """The scripted teacher: a revision request is the problem, then (attempt, feedback) turns."""
    msgs = body["messages"]
    fn = next(name for name in TESTS if f"`{name}`" in msgs[0]["content"] or f"`{name}`" in msgs[-1]["content"]
              or any(f"`{name}`" in m["content"] for m in msgs))
    turns = sum(m["role"] == "user" for m in msgs) - 1  # feedback turns so far
    if fn == "add":
        return block(CRASH if turns == 1 else RIGHT["add"])
    return block(RIGHT[fn])


def setup(tmp_path: Path, endpoint: str, *extra: str):
    prompts = [{"prompt_id": f"p-{fn}", "messages": [{"role": "user", "content": f"Write `{fn}`."}], "tests": t}
               for fn, t in TESTS.items()]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    # generate's samples: add and neg fail both samples; mul's second sample passes
    first = {"add": [WRONG["add"], WRONG["add"] + "  # again"], "mul": [WRONG["mul"], RIGHT["mul"]],
             "neg": [WRONG["neg"], "def neg(x):\n    return x * 1"]}
    samples = [{"prompt_id": f"p-{fn}", "sample_index": k, "response": block(code), "num_tokens": 10,
                "prompt_tokens": 5, "finish_reason": "stop", "system_prompt": None, "request_id": f"r-{fn}"}
               for fn, codes in first.items() for k, code in enumerate(codes)]
    write_jsonl(tmp_path / "samples.jsonl", samples)
    recipe = load_recipe(TINY, [
        f"runs_dir={tmp_path / 'runs'}", f"prompts.train_path={tmp_path / 'prompts.jsonl'}",
        f"teacher={{source: path, model_name_or_path: teacher, backend: openai, endpoints: ['{endpoint}'], "
        "retry_backoff_s: 0.01}", "reward.verifiers=[{name: code, kind: code, score: fraction}]",
        "revise={max_turns: 2}", "select.sft_min_reward=0.0", *extra])
    return recipe, {"samples": tmp_path / "samples.jsonl", "prompts": tmp_path / "prompts.jsonl",
                    "teacher": "teacher"}


def revise_score_select(recipe, inputs: dict, tmp_path: Path):
    """revise, score and select of round 1 in tmp_path/<stage>, as the round chains them; select's result."""
    for name in ("revise", "score", "select"):
        (tmp_path / name).mkdir()
    revise.run(stage(recipe, "revise"), inputs, tmp_path / "revise", 1)
    samples = tmp_path / "revise" / "samples.jsonl"
    score.run(stage(recipe, "score"), {"samples": samples, "prompts": inputs["prompts"]}, tmp_path / "score", 1)
    return select.run(stage(recipe, "select"), {"samples": samples, "scores": tmp_path / "score" / "scores.jsonl",
                                                "prompts": inputs["prompts"]}, tmp_path / "select", 1)


def stage(recipe, name: str):
    from alignment.round import stage_config

    return StageConfig(name, stage_config(recipe, name))


def test_failing_samples_are_revised_with_their_error_until_they_pass(server, tmp_path):
    Scripted.text, Scripted.hits_limit = staticmethod(teacher_answer), staticmethod(lambda body, i: False)
    recipe, inputs = setup(tmp_path, server)
    names = [s.name for s in round_stages(recipe, 1)]
    assert names[names.index("generate"):][:4] == ["generate", "revise", "score", "select"]
    out = tmp_path / "revise"
    out.mkdir()
    result = revise.run(stage(recipe, "revise"), inputs, out, 1)

    # by hand: add and neg have no passing sample, mul has one -> 2 chains (one per unsolved prompt, the best-ranked
    # failing sample: add's two (a - b) both pass 0 of 2 checks -> index 0; neg's both pass 1 of 2 -> index 0).
    # neg: turn 1 right. add: turn 1 crashes, turn 2 right. Requests: 2 in turn 1, 1 in turn 2.
    assert result.stats["revised_samples"] == 2 and result.stats["requests_sent"] == 3
    assert result.stats["passed_after_turn"] == {"1": 1, "2": 1} and result.stats["failed_after_all_turns"] == 0
    assert result.stats["first_try"] == {"prompts_passed": 1, "samples_passed": 1, "samples": 6}
    rows = read_jsonl(out / "samples.jsonl")
    revisions = [r for r in rows if "revision" in r]
    assert len(rows) == 6 + 3 and rows[:6] == read_jsonl(inputs["samples"])  # the round's samples, unchanged
    # new keys after each prompt's own samples: chain 0 of add takes indices 2 and 3 (2 turns), neg's index 2
    assert sorted((r["prompt_id"], r["sample_index"], r["revision"]["turn"], r["revision"]["of"]) for r in revisions) \
        == [("p-add", 2, 1, 0), ("p-add", 3, 2, 0), ("p-neg", 2, 1, 0)]

    # what the teacher was shown: the failing attempt, then the failing check; turn 2, the crash and its stderr
    bodies = [b for _, b in Scripted.seen]
    add2 = next(b for b in bodies if "Write `add`" in b["messages"][0]["content"] and len(b["messages"]) == 5)
    feedback1, feedback2 = add2["messages"][2]["content"], add2["messages"][4]["content"]
    assert add2["messages"][1] == {"role": "assistant", "content": block(WRONG["add"])}
    assert "0 of 2 checks passed" in feedback1 and "add(1, 2) == 3" in feedback1
    assert add2["messages"][3]["content"] == block(CRASH)
    assert "0 of 2 checks passed" in feedback2 and "tracing add" in feedback2 and "ZeroDivisionError" in feedback2
    assert all(b["n"] == 1 for b in bodies) and len({b["seed"] for b in bodies}) == 3  # a seed per request

    # a second run resumes everything from the shards: no request, the same bytes
    before, Scripted.seen = (out / "samples.jsonl").read_bytes(), []
    again = revise.run(stage(recipe, "revise"), inputs, out, 1)
    assert Scripted.seen == [] and again.stats["requests_resumed_from_shards"] == 3
    assert (out / "samples.jsonl").read_bytes() == before


def test_a_sample_that_never_passes_is_counted_and_its_error_is_cut_to_its_tail(server, tmp_path):
    # the teacher never fixes anything (always the crash, which prints a long line first); every failing sample is
    # revised, solved prompt or not: add 2, mul 1 (its first sample), neg 2 chains, 3 turns each
    long_crash = "import sys\nprint('x' * 500 + ' the end', file=sys.stderr)\nraise SystemExit(3)"
    Scripted.text, Scripted.hits_limit = staticmethod(lambda b, i: block(long_crash)), staticmethod(lambda b, i: False)
    recipe, inputs = setup(tmp_path, server, "revise={max_turns: 3, samples_per_prompt: 2, only_unsolved: false, "
                                             "feedback_chars: 120}")
    out = tmp_path / "revise"
    out.mkdir()
    result = revise.run(stage(recipe, "revise"), inputs, out, 1)
    assert result.stats["revised_samples"] == 5 and result.stats["requests_sent"] == 5 * 3
    assert result.stats["passed_after_turn"] == {"1": 0, "2": 0, "3": 0}
    assert result.stats["failed_after_all_turns"] == 5
    # the error shown after a crash: its last 120 characters, the end of the program's output kept
    shown = [b["messages"][-1]["content"] for _, b in Scripted.seen if len(b["messages"]) == 5]
    template = recipe.revise.feedback_template
    errors = [m[len(template.split("{error}")[0]):len(m) - len(template.split("{error}")[1])] for m in shown]
    assert errors and all(len(e) == 120 and e.startswith("...") and e.endswith("x the end") for e in errors)


@pytest.mark.parametrize("fmt", ["final", "dialog"])
def test_a_passing_revision_becomes_the_sft_row_and_its_first_attempt_the_rejected_side(server, tmp_path, fmt):
    Scripted.text, Scripted.hits_limit = staticmethod(teacher_answer), staticmethod(lambda body, i: False)
    recipe, inputs = setup(tmp_path, server, f"revise.sft_format={fmt}")
    result = revise_score_select(recipe, inputs, tmp_path)
    sft = {r["prompt_id"]: r for r in read_jsonl(tmp_path / "select" / "sft.jsonl")}
    pairs = {r["prompt_id"]: r for r in read_jsonl(tmp_path / "select" / "pairs.jsonl")}
    # every prompt now has a passing sample: mul's own, add's and neg's revisions
    assert set(sft) == {"p-add", "p-mul", "p-neg"} and not read_jsonl(tmp_path / "select" / "failed_prompts.jsonl")
    assert sft["p-add"]["completion"] == [{"role": "assistant", "content": block(RIGHT["add"])}]
    assert sft["p-add"]["revision_turn"] == 2 and "revision_turn" not in sft["p-mul"]
    problem = [{"role": "user", "content": "Write `add`."}]
    if fmt == "final":
        assert sft["p-add"]["prompt"] == problem
    else:  # the repair dialog before the trained answer: attempt, feedback, the crash, its feedback
        dialog = sft["p-add"]["prompt"]
        assert dialog[0] == problem[0] and [m["role"] for m in dialog] == ["user", "assistant", "user", "assistant",
                                                                          "user"]
        assert dialog[1]["content"] == block(WRONG["add"]) and dialog[3]["content"] == block(CRASH)
    # the rejected side of add's pair is its first attempt (index 0), not the worst-ranked sample (the crash)
    assert pairs["p-add"]["chosen_index"] == 3 and pairs["p-add"]["rejected_index"] == 0
    assert pairs["p-add"]["rejected"] == [{"role": "assistant", "content": block(WRONG["add"])}]
    assert result.stats["from_revisions"] == {"sft_rows": 2, "pairs_with_a_revised_chosen": 2}


def test_a_feedback_template_without_the_error_is_refused(tmp_path):
    from alignment.config import InputError

    with pytest.raises(InputError, match=r"revise.feedback_template.*must hold \{error\}"):
        load_recipe(TINY, ["revise={feedback_template: 'try again'}", "reward.verifiers=[{name: c, kind: code}]"])
    for template in ("{error} in {\"code\"}", "{{error}}", "{error} {extra}"):  # another field, or only a literal
        with pytest.raises(InputError, match=r"revise.feedback_template.*no other"):
            load_recipe(TINY, [f"revise={{feedback_template: '{template}'}}", "reward.verifiers=[{name: c, kind: code}]"])
    assert load_recipe(TINY, ["revise={feedback_template: 'Failed: {error}. Use {{braces}}.'}",
                              "reward.verifiers=[{name: c, kind: code}]"]).revise.feedback_template
    with pytest.raises(InputError, match="revise .* needs a code verifier"):
        load_recipe(TINY, ["revise={max_turns: 1}"])


def test_turning_revise_on_reruns_score_and_select_but_not_generate():
    # what a stage's fingerprint hashes: its recipe sections (less transport) and its inputs
    from alignment.round import stage_config
    from alignment.stage_table import STAGES, Upstream, hashed_config

    base = ["reward.verifiers=[{name: c, kind: code}]"]
    off, on = load_recipe(TINY, base), load_recipe(TINY, [*base, "revise={max_turns: 1}"])
    hashed = {name: [(hashed_config(stage_config(r, name)), STAGES[name].inputs(r, 1)) for r in (off, on)]
              for name in ("generate", "score", "select")}
    assert hashed["generate"][0] == hashed["generate"][1]
    assert hashed["score"][0][0] == hashed["score"][1][0]  # the same settings, other samples:
    assert hashed["score"][1][1]["samples"] == Upstream("revise", "samples", 1, "score")
    assert hashed["select"][0][0] != hashed["select"][1][0]  # reads revise's sft_format and rejected


def test_a_dialog_that_outgrows_the_teachers_context_ends_counted_instead_of_failing_the_stage(tmp_path):
    # a local teacher (transformers) whose engine allows 64 tokens: the prompt, the failing attempt (a ```python
    # block of about 45 characters) and the feedback turn (over 100 characters) are far more than 64 - 16 tokens
    # in the tiny character tokenizer, so neither unsolved prompt's dialog is sent
    from alignment.chat import build_tokenizer
    from alignment.tiny_models import random_llama, save

    tok = build_tokenizer()
    model = save(random_llama(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=1), tok, tmp_path / "teacher")
    recipe, inputs = setup(tmp_path, "http://unused/v1", "sampling.max_new_tokens=16",
                           f"teacher={{source: path, model_name_or_path: {model}, backend: transformers, "
                           "engine: {max_model_len: 64}}")
    inputs["teacher"] = model
    (tmp_path / "revise").mkdir()
    result = revise.run(stage(recipe, "revise"), inputs, tmp_path / "revise", 1)
    assert result.stats["ended_at_context_limit"] == 2 and result.stats["requests_sent"] == 0
    assert result.stats["failed_after_all_turns"] == 0 and result.rows["revisions"] == 0


def test_a_rerun_reuses_the_decided_outcomes_even_where_the_code_prints_otherwise(server, tmp_path):
    # add's failing attempts print a fresh random number each time they run: the error shown to the teacher (and
    # so the request id) would change on a re-run if the outcome were decided again; a kill can also cut the last
    # saved outcome mid-line
    Scripted.text, Scripted.hits_limit = staticmethod(teacher_answer), staticmethod(lambda body, i: False)
    recipe, inputs = setup(tmp_path, server)
    noisy = "import random, sys\nprint(random.random(), object(), file=sys.stderr)\ndef add(a, b):\n    return a - b"
    rows = read_jsonl(inputs["samples"])
    for r in rows:
        if r["prompt_id"] == "p-add":
            r["response"] = block(noisy + ("  # again" if r["sample_index"] else ""))
    write_jsonl(inputs["samples"], rows)
    out = tmp_path / "revise"
    out.mkdir()
    revise.run(stage(recipe, "revise"), inputs, out, 1)
    before, Scripted.seen = (out / "samples.jsonl").read_bytes(), []
    saved = (out / "outcomes.jsonl").read_text()
    (out / "outcomes.jsonl").write_text(saved[:-20])  # the last outcome torn: decided again, the rest reused
    again = revise.run(stage(recipe, "revise"), inputs, out, 1)
    assert Scripted.seen == [] and again.stats["requests_sent"] == 0
    assert (out / "samples.jsonl").read_bytes() == before


def test_a_first_attempt_the_filters_dropped_is_not_made_the_rejected_side(server, tmp_path):
    # add's first attempt (index 0) hit the token limit: select drops it, so add's pair keeps the pair policy's
    # rejected side (the worst-ranked kept sample: the crash, index 2) and counts why
    Scripted.text, Scripted.hits_limit = staticmethod(teacher_answer), staticmethod(lambda body, i: False)
    recipe, inputs = setup(tmp_path, server)
    rows = read_jsonl(inputs["samples"])
    rows[0]["finish_reason"] = "length"
    write_jsonl(inputs["samples"], rows)
    result = revise_score_select(recipe, inputs, tmp_path)
    pairs = {r["prompt_id"]: r for r in read_jsonl(tmp_path / "select" / "pairs.jsonl")}
    assert (pairs["p-add"]["chosen_index"], pairs["p-add"]["rejected_index"]) == (3, 2)
    assert result.stats["dropped"]["pair_first_attempt_filtered"] == 1
