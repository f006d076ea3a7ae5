"""The chat-template check before a round: the recipe's own prompts, rendered by every model's template, must
give the student's token ids; it is neither stricter (EOS tokens) nor looser (a system message the data lacks)."""

import pytest

from alignment.chat import build_tokenizer
from alignment.config import InputError
from alignment.consistency import check_chat_templates
from template_families import CHATML, families

PROMPTS = {"p1": [{"role": "user", "content": "What is 12 + 7?"}],
           "p2": [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
                  {"role": "user", "content": "And 7 - 2?"}]}


def tok(template=None, eos=None):
    t = build_tokenizer()
    if template is not None:
        t.chat_template = template
    if eos is not None:
        t.eos_token = eos
    return t


def test_identical_templates_pass():
    check_chat_templates({"student": tok(), "teacher": tok()}, PROMPTS)


def test_a_base_student_and_an_instruct_teacher_differ_in_eos_only_and_pass():
    # Llama 3.1 base: EOS <|end_of_text|>; Instruct: <|eot_id|>; the same template
    check_chat_templates({"student": tok(eos="<|end_of_text|>"), "teacher": tok()}, PROMPTS)


def test_a_missing_blank_line_is_caught_with_the_differing_tokens_decoded():
    other = tok().chat_template.replace("<|end_header_id|>\\n\\n", "<|end_header_id|>\\n")
    with pytest.raises(InputError) as e:
        check_chat_templates({"student": tok(), "teacher": tok(template=other)}, PROMPTS)
    msg = str(e.value)
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|> is 7 tokens; then "\n\n" vs "\nW"
    assert "render prompt 'p1' differently from token 8: teacher has 'What', student has '\\nWha'" in msg
    assert r"user<|end_header_id|>\n\nWhat is 12" in msg and r"user<|end_header_id|>\nWhat is 12" in msg


def test_templates_differing_only_in_their_default_system_prompt_are_caught():
    # The data's prompts have no system message, so the default is what the teacher would see.
    other = CHATML.replace("You are a helpful AI assistant.", "You are SmolLM.")
    a, b = families()["chatml"][0], families()["chatml"][0]
    b.chat_template = other
    with pytest.raises(InputError, match="render prompt 'p1' differently from token"):
        check_chat_templates({"student": a, "teacher": b}, PROMPTS)
    # the old check's sample conversation, which has a system message, would not have seen it
    check_chat_templates({"student": a, "teacher": b}, {"s": [{"role": "system", "content": "Be brief."}, *PROMPTS["p1"]]})


def test_a_different_end_of_turn_is_caught_on_the_answer():
    other = tok().chat_template.replace("else '<|eot_id|>' }}{% endgeneration %}",
                                        "else '<|end_of_text|>' }}{% endgeneration %}")
    assert other != tok().chat_template
    with pytest.raises(InputError, match="teacher has '<\\|end_of_text\\|>', student has '<\\|eot_id\\|>'"):
        check_chat_templates({"student": tok(), "teacher": tok(template=other)}, PROMPTS)


def test_a_template_with_no_system_role_is_an_input_error_not_a_jinja_traceback():
    gemma = families()["gemma"][0]
    check_chat_templates({"student": gemma, "teacher": families()["gemma"][0]}, PROMPTS)  # no system: fine
    with pytest.raises(InputError, match=r"student \(.*\): its chat template refuses a conversation with roles "
                                         r"\['system', 'user'\]: System role not supported"):
        check_chat_templates({"student": gemma, "teacher": gemma}, {"s": [{"role": "system", "content": "Hi."},
                                                                         *PROMPTS["p1"]]})
