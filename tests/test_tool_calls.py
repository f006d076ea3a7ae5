"""Turns kept intact: a tool-call step (Llama 3.1: `<|python_tag|>` opens it, `<|eom_id|>` ends it) goes from the
teacher's tokens through generate, select and the SFT collator as the same tokens, never re-rendered as a
finished `<|eot_id|>` turn, and a dialog's assistant messages are each trained with everything before them.

Expected token ids are the tiny Llama 3 template's own rendering of the dialog (Meta's reference format: a message
with `stop_reason: end_of_message` ends in `<|eom_id|>`), tokenized independently of the code under test."""

import json
from pathlib import Path

import pytest
from template_families import families
from test_generate import Scripted, server  # noqa: F401  (the scripted teacher server and its fixture)

from alignment.chat import build_tokenizer
from alignment.config import InputError, load_recipe
from alignment.prompts import read_jsonl, write_jsonl
from alignment.stages import generate, select
from alignment.stages.sft import assemble, build_trainer
from alignment.template import check_end_of_message, decode_response
from alignment.tiny_models import random_llama

ROOT = Path(__file__).resolve().parents[1]
ASK = {"role": "user", "content": "What is 6 * 7? Use the interpreter."}
CALL = "<|python_tag|>print(6 * 7)"
STEP = {"role": "assistant", "content": CALL, "stop_reason": "end_of_message"}
OUTPUT = {"role": "ipython", "content": "42"}
FINAL = "The interpreter says 42."
TINY = dict(seed=0, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_decoding_keeps_the_python_tag_and_drops_stray_formatting_tokens():
    tok = build_tokenizer()
    # by hand: the model wrote the tag, code, then a header token it should not have; the tag is content
    written = ids(tok, "<|python_tag|>x = 1<|start_header_id|>")
    assert decode_response(tok, written) == "<|python_tag|>x = 1"
    assert tok.decode(written, skip_special_tokens=True) == "x = 1"  # what every backend recorded before


def test_the_tiny_template_renders_a_tool_call_dialog_as_meta_s_format():
    tok = build_tokenizer()
    text = tok.apply_chat_template([ASK, STEP, OUTPUT, {"role": "assistant", "content": FINAL}], tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 6 * 7? Use the "
                    "interpreter.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>print(6 * 7)"
                    "<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nThe interpreter says 42.<|eot_id|>")


def teacher(tmp_path: Path) -> Path:
    """A teacher folder the OpenAI backend can read a tokenizer from (the scripted server does the answering)."""
    from alignment.tiny_models import save

    return save(random_llama(build_tokenizer(), **TINY), build_tokenizer(), tmp_path / "teacher")


def answers(body: dict, i: int) -> tuple[str, str]:
    """The scripted teacher's i-th sample and how it ends: after the interpreter's output (a conversation holding
    a tool-call step, which comes as token ids to the completions API), the answer; before it, sample 0 calls the
    tool and sample 1 answers without it."""
    if "prompt" in body:
        return (FINAL, "<|eot_id|>") if i == 0 else ("I think 41.", "<|eot_id|>")
    return (CALL, "<|eom_id|>") if i == 0 else ("It is 42.", "<|eot_id|>")


def test_a_tool_call_step_round_trips_from_teacher_tokens_to_training_tokens(server, tmp_path):  # noqa: F811
    tok = build_tokenizer()
    folder = teacher(tmp_path)
    Scripted.models = [str(folder)]
    # like vLLM's server: the text drops special tokens (<|python_tag|> too); the token ids hold them and the end
    Scripted.text = staticmethod(lambda body, i: answers(body, i)[0].replace("<|python_tag|>", ""))
    Scripted.token_ids = staticmethod(lambda body, i: ids(tok, "".join(answers(body, i))))
    Scripted.hits_limit = staticmethod(lambda body, i: False)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": "call", "messages": [ASK]},
                                             {"prompt_id": "after", "messages": [ASK, STEP, OUTPUT]}])
    recipe = load_recipe(str(ROOT / "recipes/tiny.yaml"), [
        f"runs_dir={tmp_path / 'runs'}", f"prompts.train_path={tmp_path / 'prompts.jsonl'}", "sampling.num_samples=2",
        f"teacher={{source: path, model_name_or_path: {folder}, backend: openai, endpoints: ['{server}'], "
        "retry_backoff_s: 0.01, system_prompts: {}}", "select.sft_min_reward=0.0", "sft.report_to=[]",
        "sft.max_length=512"])
    from test_revise import stage

    for name in ("generate", "select"):
        (tmp_path / name).mkdir()
    inputs = {"prompts": tmp_path / "prompts.jsonl", "teacher": folder}
    result = generate.run(stage(recipe, "generate"), inputs, tmp_path / "generate", 1)
    samples = read_jsonl(tmp_path / "generate/samples.jsonl")
    got = {(s["prompt_id"], s["sample_index"]): (s["response"], s.get("stop_reason")) for s in samples}
    assert got == {("call", 0): (CALL, "end_of_message"), ("call", 1): ("It is 42.", None),
                   ("after", 0): (FINAL, None), ("after", 1): ("I think 41.", None)}
    assert result.stats["tool_call_steps"] == 1
    # what the teacher was sent for the second prompt: the template's tokens of the tool-call step with its ending
    # and the tool's output (the chat API has no field for the ending), then the assistant's header
    sent = next(b for _, b in Scripted.seen if "prompt" in b)
    assert sent["prompt"] == ids(tok, tok.apply_chat_template([ASK, STEP, OUTPUT], tokenize=False,
                                                              add_generation_prompt=True))
    assert tok.convert_tokens_to_ids("<|eom_id|>") in sent["prompt"] and "messages" not in sent

    # scores by hand: the tool call is the better answer to "call", the right final answer to "after"
    write_jsonl(tmp_path / "scores.jsonl", [
        {"prompt_id": p, "sample_index": k, "reward": r, "scores": {"rm": r}}
        for (p, k), r in {("call", 0): 1.0, ("call", 1): 0.0, ("after", 0): 1.0, ("after", 1): 0.0}.items()])
    sel = select.run(stage(recipe, "select"), {"samples": tmp_path / "generate/samples.jsonl",
                                               "scores": tmp_path / "scores.jsonl",
                                               "prompts": tmp_path / "prompts.jsonl"}, tmp_path / "select", 1)
    sft_rows = {r["prompt_id"]: r for r in read_jsonl(tmp_path / "select/sft.jsonl")}
    assert sft_rows["call"]["completion"] == [STEP]
    assert sft_rows["after"]["prompt"] == [ASK, STEP, OUTPUT]
    pairs = {r["prompt_id"]: r for r in read_jsonl(tmp_path / "select/pairs.jsonl")}
    assert pairs["call"]["chosen"] == [STEP] and pairs["call"]["rejected"] == [{"role": "assistant",
                                                                                "content": "It is 42."}]
    assert sel.stats["tool_call_steps"] == {"sft": 1, "pairs": 1}

    # the SFT collator's tokens: the template's own rendering; the trained tokens are exactly what the teacher wrote
    rows = [sft_rows["call"], sft_rows["after"]]
    trainer = build_trainer(recipe, random_llama(tok, **TINY),
                            tok, rows, tmp_path / "sft")
    data = {tuple(x["input_ids"]): x["labels"] for x in trainer.train_dataset}  # labels: -100 outside the loss
    for row, written in ((rows[0], CALL + "<|eom_id|>"), (rows[1], FINAL + "<|eot_id|>")):
        full = ids(tok, tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False))
        assert [t for t in data[tuple(full)] if t != -100] == ids(tok, written)


def test_a_curated_tool_call_dialog_trains_each_assistant_message_after_all_before_it(tmp_path):
    path = tmp_path / "dialogs.jsonl"
    path.write_text(json.dumps({"messages": [ASK, STEP, OUTPUT, {"role": "assistant", "content": FINAL}]}) + "\n")
    recipe = load_recipe(str(ROOT / "recipes/tiny.yaml"), [f"sft.extra_sources=[{{path: {path}}}]"])
    write_jsonl(tmp_path / "none.jsonl", [])
    rows, sources = assemble(recipe.sft, {"sft": tmp_path / "none.jsonl", "extra_sft": [path]}, 0, 1)
    # by hand: two assistant messages -> two examples; the interpreter's output is context, never a completion
    assert [(r["prompt"], r["completion"]) for r in rows] == [
        ([ASK], [STEP]), ([ASK, STEP, OUTPUT], [{"role": "assistant", "content": FINAL}])]
    assert sources[str(path)]["used"] == 2


def test_a_completion_holding_a_tool_output_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": [ASK], "completion": [STEP, OUTPUT]}) + "\n")
    recipe = load_recipe(str(ROOT / "recipes/tiny.yaml"), [f"sft.extra_sources=[{{path: {path}}}]"])
    write_jsonl(tmp_path / "none.jsonl", [])
    with pytest.raises(InputError, match=r"bad.jsonl: row 1: completion: every message is trained on, so all must "
                                         r"be the assistant's, got a ipython message"):
        assemble(recipe.sft, {"sft": tmp_path / "none.jsonl", "extra_sft": [path]}, 0, 1)


def every_message_ends_its_turn():
    """Llama 3's format as the Hub's Llama 3.1 template writes plain messages: <|eot_id|> after every one (it
    picks <|eom_id|> by a `builtin_tools` argument, never by the message). The tokenizer has <|eom_id|>."""
    tok = build_tokenizer()
    tok.chat_template = tok.chat_template.replace(
        "{{- '<|eom_id|>' if message.get('stop_reason') == 'end_of_message' else '<|eot_id|>' }}", "{{- '<|eot_id|>' }}")
    assert tok.chat_template != build_tokenizer().chat_template
    return tok


@pytest.mark.parametrize("family", [*sorted(families()), "llama3-eot-always"])
def test_a_template_that_ends_every_message_alike_is_refused_for_tool_call_steps(family):
    """Only a template that writes <|eom_id|> after a message with stop_reason end_of_message may train one; any
    other would teach the step as a finished turn (ChatML has no such token at all)."""
    tok = every_message_ends_its_turn() if family == "llama3-eot-always" else families()[family][0]
    if family == "llama3":
        check_end_of_message(tok, family)
    else:
        with pytest.raises(InputError, match=rf"{family}: rows hold tool-call steps .* does not end such a message "
                                             r"with <\|eom_id\|>"):
            check_end_of_message(tok, family)


def test_tool_call_rows_a_students_template_would_end_as_turns_are_left_out_and_counted(tmp_path, capsys):
    """Llama 3.1's Hub template cannot end a message with <|eom_id|>: a teacher sample that ended on it is left out
    of SFT (counted, with a warning that says why) instead of being trained as a finished turn; when every row is
    such a step, the recipe means to train tool calls, and this template cannot: an error."""
    from alignment.tiny_models import save
    from alignment.training import selected_rows

    folder = save(random_llama(build_tokenizer(), **TINY), every_message_ends_its_turn(), tmp_path / "student")
    rows = [{"prompt": [ASK], "completion": [STEP]}]
    with pytest.raises(InputError, match="rows hold tool-call steps"):
        selected_rows(rows, tmp_path / "sft.jsonl", "SFT examples", folder, 512, "sft.max_length", ("completion",))
    plain = {"prompt": [ASK], "completion": [{"role": "assistant", "content": FINAL}]}
    kept, _, over, left_out = selected_rows([plain, *rows, plain], tmp_path / "sft.jsonl", "SFT examples", folder,
                                            512, "sft.max_length", ("completion",))
    assert kept == [plain, plain] and (over, left_out) == (0, 1)
    assert "warning: 1 of 3 SFT examples hold a tool-call step and are left out" in capsys.readouterr().out
    # a template that ends the step as it was written keeps every row
    good = save(random_llama(build_tokenizer(), **TINY), build_tokenizer(), tmp_path / "good")
    assert selected_rows([plain, *rows], tmp_path / "sft.jsonl", "SFT examples", good, 512, "sft.max_length",
                         ("completion",))[3] == 0


def test_the_transformers_sampler_records_an_end_of_message_ending():
    """A model whose every logit but <|eom_id|>'s is zero ends each sample on it at once: by hand, an empty tool-call
    step, `stop`, with stop_reason end_of_message; the same model pointed at <|eot_id|> records no stop_reason."""
    import torch

    from alignment.backends.hf import sample

    tok = build_tokenizer()
    model = random_llama(tok, **TINY)
    got = {}
    for end in ("<|eom_id|>", "<|eot_id|>"):
        head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
        torch.nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(tok.convert_tokens_to_ids(end)),
                                                        model.lm_head.out_features).float() * 100)
        model.lm_head = head
        [[c]] = sample(model, tok, [[ASK]], num_samples=1, temperature=1.0, top_p=1.0, max_new_tokens=4,
                       batch_size=1, seeds=[0], desc="test")
        got[end] = (c.text, c.num_tokens, c.finish_reason, c.stop_reason)
    assert got == {"<|eom_id|>": ("", 0, "stop", "end_of_message"), "<|eot_id|>": ("", 0, "stop", None)}


def test_validate_refuses_tool_call_prompts_for_endpoints_that_nothing_here_can_render_for(tmp_path):
    from alignment import preflight

    def validate(recipe, overrides):  # the prompt checks, as validate, round, eval and stage run them
        return preflight.run(recipe, overrides, "status")

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": "after", "messages": [ASK, STEP, OUTPUT], "answer": "42"}])
    base = [f"prompts.train_path={tmp_path / 'prompts.jsonl'}"]
    remote = lambda model: [f"teacher={{source: path, model_name_or_path: {model}, backend: openai, "  # noqa: E731
                            "endpoints: ['http://127.0.0.1:9/v1']}"]
    with pytest.raises(InputError, match=r"prompts.jsonl: prompt 'after' holds a tool-call step .* which OpenAI's chat "
                                         r"API cannot carry, and the teacher's endpoints serve a model that is not a "
                                         r"local folder"):
        validate(str(ROOT / "recipes/tiny.yaml"), [*base, *remote("org/remote-model")])
    assert validate(str(ROOT / "recipes/tiny.yaml"), [*base, *remote(teacher(tmp_path))]).train == 1  # renders here
    assert validate(str(ROOT / "recipes/tiny.yaml"), base).train == 1  # the transformers teacher renders it
