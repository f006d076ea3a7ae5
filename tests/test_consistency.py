import pytest

from alignment.chat import build_tokenizer
from alignment.config import InputError
from alignment.consistency import check_chat_templates


def save(tmp_path, name, template=None, eos=None):
    tok = build_tokenizer()
    if template is not None:
        tok.chat_template = template
    if eos is not None:
        tok.eos_token = eos
    tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_identical_templates_pass(tmp_path):
    check_chat_templates({"student": save(tmp_path, "a"), "teacher": save(tmp_path, "b")})


def test_a_template_without_the_blank_line_is_caught_with_both_renderings(tmp_path):
    tok = build_tokenizer()
    other = tok.chat_template.replace("<|end_header_id|>\\n\\n", "<|end_header_id|>\\n")
    assert other != tok.chat_template
    with pytest.raises(InputError) as e:
        check_chat_templates({"student": save(tmp_path, "a"), "teacher": save(tmp_path, "b", template=other)})
    msg = str(e.value)
    assert "teacher" in msg and "student" in msg
    # <|begin_of_text|><|start_header_id|>system<|end_header_id|> is 9 tokens, then the blank line differs
    assert "first differing token at position 10" in msg
    assert r"system<|end_header_id|>\n\nAnswer" in msg and r"system<|end_header_id|>\nAnswer" in msg


def test_a_different_end_of_turn_token_is_caught(tmp_path):
    with pytest.raises(InputError, match=r"end-of-turn '<\\|end_of_text\\|>' vs '<\\|eot_id\\|>'"):
        check_chat_templates({"student": save(tmp_path, "a"), "reward model": save(tmp_path, "b", eos="<|end_of_text|>")})
