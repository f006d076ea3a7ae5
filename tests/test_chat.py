from alignment.chat import build_tokenizer, render


def test_llama3_chat_format_matches_the_paper_spelling():
    tok = build_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "2 + 3 = 5"}]
    expected = ("<|begin_of_text|>"
                "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5<|eot_id|>")
    assert render(tok, messages) == expected
    assert render(tok, messages[:2], add_generation_prompt=True) == (
        expected[: expected.index("2 + 3 = 5")])


def test_special_tokens_are_single_tokens_and_text_round_trips():
    tok = build_tokenizer()
    ids = tok("<|start_header_id|>ab 1<|eot_id|>", add_special_tokens=False).input_ids
    assert len(ids) == 6  # header, 'a', 'b', ' ', '1', eot
    assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.decode(ids, skip_special_tokens=True) == "ab 1"
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.bos_token == "<|begin_of_text|>"
