"""Llama 3 chat format and a tiny character-level tokenizer that speaks it.

The tiny recipes cannot download Meta's tokenizer, so we build one in code: every printable ASCII character is a
token, plus Llama 3's special tokens with their real spellings. Because the special tokens and the chat template
are the real ones, every stage (SFT prompt masking, DPO, generation stopping at `<|eot_id|>`) exercises the same
code path it would with Llama-3.1-8B-Instruct's tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
ROLES = ("system", "user", "assistant", "ipython")

# Llama 3's template, without the tool-calling preamble that the tiny task never uses. An assistant message with
# `stop_reason: end_of_message` (a tool-call step, opened by <|python_tag|> in its content) ends with <|eom_id|>,
# as in Meta's reference format (llama-models' ChatFormat); any other ends its turn with <|eot_id|>. The
# `{% generation %}` markers let TRL compute assistant-only masks when a dataset is given as whole conversations.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim }}"
    "{{- '<|eom_id|>' if message.get('stop_reason') == 'end_of_message' else '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def char_tokenizer(special_tokens: list[str], template: str, **named) -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer with the given special tokens and chat template; `named` says
    which is which (bos_token=..., eos_token=..., pad_token=...). Tests build other families' formats with it."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII plus space and newline
    vocab = {tok: i for i, tok in enumerate(special_tokens + ["<unk>"] + chars)}
    # BPE with no merges is a character tokenizer; unknown characters map to <unk> instead of failing.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()  # join characters back without spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", model_max_length=4096, **named,
        additional_special_tokens=[t for t in special_tokens if t not in named.values()],
        padding_side="left",  # generation pads on the left; trainers set their own side
    )
    tok.chat_template = template
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny recipes' tokenizer: Llama 3's special tokens and chat template. A chat model ends its turn with
    <|eot_id|>, so that is its EOS; generation stops there."""
    return char_tokenizer(SPECIAL_TOKENS, LLAMA3_CHAT_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                          pad_token="<|finetune_right_pad_id|>")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render a conversation as text with the tokenizer's own chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The conversation's token ids, as trainers and engines see it (the template writes the BOS itself).
    transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding, whose len() is its number of
    keys, not of tokens: counting through this function avoids that trap."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt), add_special_tokens=False).input_ids
