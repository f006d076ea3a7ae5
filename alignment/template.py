"""What a model's own chat template says about its format, so no stage assumes Llama 3's tokens.

Each function renders conversations whose contents are sentinels and reads the format off what surrounds them:
- the formatting tokens: special tokens the template writes around contents (Llama 3's headers and
  `<|eot_id|>`, ChatML's `<|im_start|>`/`<|im_end|>`, Gemma's turn markers, Mistral's `[INST]`);
- the end of turn: the first special token the template writes after an assistant's content (a Llama 3.1 base
  tokenizer's EOS is `<|end_of_text|>`, while its template ends a turn with `<|eot_id|>`);
- the pad token, chosen once for every stage (Llama 3 base tokenizers ship without one).
"""

from __future__ import annotations

from jinja2 import TemplateError

from alignment.config import InputError

SENTINEL = "Zq{}xJ"  # text no template writes itself; {} tells the messages apart


def conversation(system: bool) -> list[dict]:
    turns = [("user", 1), ("assistant", 2), ("user", 3), ("assistant", 4)]
    return [{"role": r, "content": SENTINEL.format(i)} for r, i in ([("system", 0)] if system else []) + turns]


def render_or_refuse(tokenizer, messages: list[dict], where: str, add_generation_prompt=False) -> str:
    """The template's text, or an InputError naming the model when the template refuses the conversation (Gemma's
    raises on a system message)."""
    if not tokenizer.chat_template:
        raise InputError(f"{where}: the tokenizer has no chat template; a chat model's tokenizer_config.json has one")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        roles = [m["role"] for m in messages]
        raise InputError(f"{where}: its chat template refuses a conversation with roles {roles}: {e}") from None


def special_ids(tokenizer, text: str) -> list[int]:
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [i for i in tokenizer(text, add_special_tokens=False).input_ids if i in special]


def formatting_token_ids(tokenizer) -> list[int]:
    """Special tokens the template writes around contents, and the tokens that end a turn. Only special tokens:
    an ordinary token the template also writes (a newline, the word "assistant") occurs inside contents too, and
    masking it by id would mask the response's own text. The contents are sentinels without any, so every special
    token of the conversation rendered with and (where allowed) without a system turn is the template's."""
    found = set()
    for system in (True, False):
        try:
            found.update(special_ids(tokenizer, tokenizer.apply_chat_template(conversation(system), tokenize=False)))
        except TemplateError:
            continue  # a template without a system role
    return sorted(found | stop_token_ids(tokenizer)) if found else []


def end_of_turn_id(tokenizer, where: str) -> int:
    """The first special token the template writes after an assistant's content."""
    text = render_or_refuse(tokenizer, conversation(False)[:2], where)
    after = special_ids(tokenizer, text.rpartition(SENTINEL.format(2))[2])
    if not after:
        raise InputError(f"{where}: its chat template writes no special token after an assistant turn, so "
                         "generation could not tell where a turn ends")
    return after[0]


def stop_token_ids(tokenizer) -> set[int]:
    """Where a sample ends: the template's end of turn, the tokenizer's EOS, and Llama 3's end of a tool-call step."""
    eom = tokenizer.get_vocab().get("<|eom_id|>")
    return {end_of_turn_id(tokenizer, tokenizer.name_or_path), tokenizer.eos_token_id, eom} - {None}


# A tool-call step (Llama 3.1): the assistant opens it with <|python_tag|> and ends it with <|eom_id|> ("end of
# message": the tool runs, its output comes back as an `ipython` message, and the assistant's turn goes on) instead
# of <|eot_id|>. Meta's reference format (llama-models' ChatFormat) records the ending on the message as
# `stop_reason: end_of_message`; we use the same key, so a sample, an SFT row and a prompt file say it alike.
CONTENT_SPECIAL_TOKENS = ("<|python_tag|>",)  # special tokens that are part of a message's content
END_OF_MESSAGE_TOKEN = "<|eom_id|>"
END_OF_MESSAGE = "end_of_message"  # a message's `stop_reason` when it ends a tool-call step


def holds_tool_call_step(messages: list[dict]) -> bool:
    """Does the conversation hold a message that ended a tool-call step? OpenAI's chat API has no field for it, and
    vLLM's chat parsing keeps only the fields it knows: such a conversation must be rendered by us."""
    return any(m.get("stop_reason") == END_OF_MESSAGE for m in messages)


def decoding_ids(tokenizer) -> tuple[set[int], set[int], int | None]:
    """(special ids to drop, content special ids to keep, <|eom_id|>'s id), read once per tokenizer: get_vocab()
    builds a dict of the whole vocabulary (128K entries for Llama 3), far too slow to repeat for every sample."""
    cached = getattr(tokenizer, "_decoding_ids", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        keep = {vocab[t] for t in CONTENT_SPECIAL_TOKENS if t in vocab}
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        cached = (special - keep, keep, vocab.get(END_OF_MESSAGE_TOKEN))
        tokenizer._decoding_ids = cached
    return cached


def decode_response(tokenizer, ids: list[int]) -> str:
    """A response's text as every backend records it: special tokens dropped (a stray header token is not text),
    except those that belong to the content (<|python_tag|>), which the template must write back when the message
    is rendered again. `ids` stop before the token that ended the response."""
    drop = decoding_ids(tokenizer)[0]
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)


def stop_reason_of(tokenizer, token_id: int | None) -> str | None:
    """`end_of_message` when a response ended on <|eom_id|> (a tool-call step); None for an ordinary end of turn
    or a response cut at the token limit, so rows of templates without tool calls carry no new key."""
    eom = decoding_ids(tokenizer)[2]
    return END_OF_MESSAGE if token_id is not None and token_id == eom else None


def check_end_of_message(tokenizer, where: str) -> None:
    """A model trained on tool-call steps must have a template that ends a message with `stop_reason:
    end_of_message` in <|eom_id|>, or those steps would be trained as finished turns. Raises InputError naming the
    model when it does not (Llama 3.1's Hub template decides <|eom_id|> by `builtin_tools`, not per message)."""
    probe = "Zq9xJ"
    messages = [{"role": "user", "content": SENTINEL.format(1)},
                {"role": "assistant", "content": probe, "stop_reason": END_OF_MESSAGE}]
    text = render_or_refuse(tokenizer, messages, where)
    after = special_ids(tokenizer, text.rpartition(probe)[2])
    eom = tokenizer.get_vocab().get(END_OF_MESSAGE_TOKEN)
    if eom is None or not after or after[0] != eom:
        raise InputError(f"{where}: rows hold tool-call steps (a message with stop_reason: end_of_message, which "
                         f"the model ended with {END_OF_MESSAGE_TOKEN}), but this chat template does not end such a "
                         f"message with {END_OF_MESSAGE_TOKEN}; training them would teach a finished turn instead. "
                         "Use a template that honours a message's stop_reason (as Meta's reference format does)")


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")  # reserved pads of common families


def ensure_pad_token(tokenizer, where: str) -> str:
    """Give the tokenizer a pad token if it has none, the same way in every stage, and say which: its own; else a
    reserved pad token its vocabulary already has (Llama 3's `<|finetune_right_pad_id|>`); else its EOS. Padded
    positions are masked out of attention and loss, so the choice changes no result, only whether it runs."""
    if tokenizer.pad_token is not None:
        return "own"
    vocab = tokenizer.get_vocab()
    token = next((t for t in PAD_CANDIDATES if t in vocab), tokenizer.eos_token)
    if token is None:
        raise InputError(f"{where}: the tokenizer has neither a pad token nor an EOS token to pad with")
    tokenizer.pad_token = token
    return token


def load_tokenizer(path, where: str | None = None):
    """The model's tokenizer as every stage uses it: with a pad token (ensure_pad_token), which it records in
    `tokenizer.pad_choice` for the stage's statistics."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_choice = ensure_pad_token(tokenizer, where or str(path))
    return tokenizer
