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
