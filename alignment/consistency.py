"""Before a round: every model that writes what the student learns from must render conversations identically.

Teacher and student each carry their own tokenizer and chat template. If the teacher's template writes what the
student's does not (another end of turn, another default system prompt, another header), training silently learns
the wrong format. So each renders a sample of the recipe's own prompts, with and without an answer, and must
produce the student's token ids exactly. A reward model reads conversations as messages and renders them with
its own template (Skywork's Llama 3.1 reward model has no date header): it must render them, not alike. EOS tokens are not compared: a Llama 3.1 base tokenizer
(EOS `<|end_of_text|>`) and the Instruct one (`<|eot_id|>`) render conversations identically.
"""

from __future__ import annotations

from alignment.chat import token_ids
from alignment.config import InputError
from alignment.prompts import system_prompt_for
from alignment.template import render_or_refuse

SAMPLE_ANSWER = "The answer is 19."


def renderings(tokenizer, messages: list[dict], where: str) -> list[tuple[str, list[int]]]:
    """(text, ids) of the prompt as the teacher is asked it, and of the conversation with an answer after it."""
    answered = messages + [{"role": "assistant", "content": SAMPLE_ANSWER}]
    texts = [render_or_refuse(tokenizer, messages, where, add_generation_prompt=True),
             render_or_refuse(tokenizer, answered, where)]
    return [(text, tokenizer(text, add_special_tokens=False).input_ids) for text in texts]


def check_chat_templates(tokenizers: dict[str, object], conversations: dict[str, list[dict]]) -> None:
    """tokenizers: role -> tokenizer, the first being the reference; conversations: prompt id -> messages.
    Raises InputError at the first disagreement, with the differing tokens decoded and both renderings."""
    (ref_name, ref), *others = tokenizers.items()
    for pid, messages in conversations.items():
        expected = renderings(ref, messages, f"{ref_name} ({ref.name_or_path})")
        for name, tok in others:
            for (ref_text, ref_ids), (text, ids) in zip(expected, renderings(tok, messages, f"{name} ({tok.name_or_path})")):
                if ids == ref_ids:
                    continue
                at = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
                raise InputError(
                    f"chat templates disagree: {name} ({tok.name_or_path}) and {ref_name} ({ref.name_or_path}) render "
                    f"prompt {pid!r} differently from token {at}: {name} has {tok.decode(ids[at:at + 4])!r}, "
                    f"{ref_name} has {ref.decode(ref_ids[at:at + 4])!r}.\n  {ref_name}: {ref_text!r}\n  {name}: {text!r}")


def check_prompt_lengths(prompts, model: str, tokenizer, max_new_tokens: int, key: str, system_prompts: dict[str, str],
                         max_model_len: int | None = None) -> None:
    """Before generating: every prompt of the source, with its system prompt and the `key` tokens it may add, fits
    the model's context; else the file and line (or row) of the first that does not. (A 1 MB prompt once reached
    the engine and took 6 GB before failing.)"""
    from transformers import AutoConfig

    context = min(n for n in (getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None),
                              max_model_len, 1 << 40) if n)
    budget = context - max_new_tokens
    overhead = len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                           add_generation_prompt=True)).input_ids)
    for i, row in enumerate(prompts):
        system = system_prompt_for(row, system_prompts)
        messages = ([{"role": "system", "content": system}] if system else []) + row["messages"]
        if sum(len(m["content"].encode()) + 16 for m in messages) + overhead <= budget:
            continue  # no tokenizer makes more tokens than UTF-8 bytes (16 for a header): it fits untokenized
        n = len(token_ids(tokenizer, messages, add_generation_prompt=True))
        if n > budget:
            raise InputError(f"{prompts.where(i)}: prompt {row['prompt_id']!r} is {n} tokens; with {key}="
                             f"{max_new_tokens} it does not fit {model}'s context of {context} tokens")
