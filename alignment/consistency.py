"""Before a round: every model that reads or writes conversations must render them identically.

Teacher, student and reward model each carry their own tokenizer and chat template. If the teacher writes
`<|eot_id|>` where the student expects another end-of-turn token, or the reward model renders headers
differently, training silently learns the wrong format. So each is checked, token by token, on one sample
conversation, against the student's rendering.
"""

from __future__ import annotations

from alignment.config import InputError

SAMPLE = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19"},
    {"role": "user", "content": "And 19 - 4?"},
]


def rendering(tokenizer) -> tuple[str, list[int], str | None]:
    text = tokenizer.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token


def check_chat_templates(models: dict[str, str]) -> None:
    """models: role -> path, the first being the reference; raises InputError showing both renderings."""
    from transformers import AutoTokenizer  # here, so `align status` and `align validate` start in a second

    (ref_name, ref_path), *others = models.items()
    ref_text, ref_ids, ref_eos = rendering(AutoTokenizer.from_pretrained(ref_path))
    for name, path in others:
        text, ids, eos = rendering(AutoTokenizer.from_pretrained(path))
        if ids == ref_ids and eos == ref_eos:
            continue
        at = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        raise InputError(
            f"chat templates disagree: {name} ({path}) and {ref_name} ({ref_path}) render the same conversation "
            f"differently (end-of-turn {eos!r} vs {ref_eos!r}; first differing token at position {at}).\n"
            f"  {ref_name}: {ref_text!r}\n  {name}: {text!r}")


def check_prompt_lengths(source, model: str, max_new_tokens: int, key: str, system_prompts: dict[str, str],
                         max_model_len: int | None = None) -> None:
    """Before generating: every prompt of the source, with its system prompt and the `key` tokens it may add, fits
    the model's context; else the file and line (or row) of the first that does not. (A 1 MB prompt once reached
    the engine and took 6 GB before failing.)"""
    from transformers import AutoConfig, AutoTokenizer

    from alignment.prompts import read_prompts
    from alignment.stages.generate import system_prompt_for

    tokenizer = AutoTokenizer.from_pretrained(model)
    context = min(n for n in (getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None),
                              max_model_len, 1 << 40) if n)
    budget = context - max_new_tokens
    overhead = len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                           add_generation_prompt=True)).input_ids)
    prompts = read_prompts(source)
    for i, row in enumerate(prompts):
        system = system_prompt_for(row, system_prompts)
        messages = ([{"role": "system", "content": system}] if system else []) + row["messages"]
        if sum(len(m["content"].encode()) + 16 for m in messages) + overhead <= budget:
            continue  # no tokenizer makes more tokens than UTF-8 bytes (16 for a header): it fits untokenized
        n = len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False).input_ids)
        if n > budget:
            raise InputError(f"{prompts.where(i)}: prompt {row['prompt_id']!r} is {n} tokens; with {key}="
                             f"{max_new_tokens} it does not fit {model}'s context of {context} tokens")
