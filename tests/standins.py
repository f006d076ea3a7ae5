"""Stand-ins, built in code, for what the shipped recipes read from the Hub and from nltk's data server, neither of
which this machine can reach: each model a recipe names, as a tiny random model of the same architecture class and
chat-template family; each dataset, as a few rows in the repo's own layout and columns; nltk's punkt_tab, as
parameters trained here on a paragraph of text. All go into a Hub cache laid out as huggingface_hub writes it, so
the pinned-revision path, the pins file and `datasets`' own config and split mapping run as they would on a cluster
with a network (tests/test_rehearsal.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignment.chat import SPECIAL_TOKENS, char_tokenizer
from hub_configs import write_snapshot

# Llama 3.1 Instruct's template, without tools: every conversation opens with a system header holding the knowledge
# cut-off and today's date, then the conversation's own system message, if any (Meta's published template).
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Skywork-Reward-Llama-3.1-8B-v0.2's own: Llama 3's turns with no date header (its tokenizer_config.json)
SKYWORK = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

COMMIT = "5" * 40  # every stand-in's commit: `main` in the cache
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,  # (vLLM CPU: head 32)
             max_position_embeddings=8192)  # the context the recipes ask of their engines


def llama_tokenizer(template: str):
    return char_tokenizer(SPECIAL_TOKENS, template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                          pad_token="<|finetune_right_pad_id|>")


def write_model(cache: Path, repo_id: str, template: str, seed: int, classifier: bool = False) -> Path:
    import tempfile

    import torch
    from transformers import LlamaForSequenceClassification

    from alignment.tiny_models import llama_config, random_llama, save

    tok = llama_tokenizer(template)
    if classifier:  # a reward model: one score per conversation
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(llama_config(tok, **SHAPE, num_labels=1))
    else:
        model = random_llama(tok, seed=seed, **SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tok, Path(tmp))
        files = {f.name: f.read_bytes() for f in Path(tmp).iterdir()}
    return write_snapshot(cache, "model", repo_id, COMMIT, files)


def parquet(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def configs_readme(configs: dict[str, dict[str, str]]) -> str:
    """A dataset card whose YAML maps each config's splits to files, as the Hub's parquet repos have."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    return "\n".join(lines + ["---", ""])


def gsm8k_rows(start: int, n: int) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i % 7 + 2} more. How many apples does he have?",
             "answer": f"He has {i} + {i % 7 + 2} = <<{i}+{i % 7 + 2}={2 * i % 7 + i}>> apples.\n#### {i + i % 7 + 2}"}
            for i in range(start, start + n)]


def mbpp_rows(start: int, n: int) -> list[dict]:
    return [{"task_id": i, "text": f"Write a function to add {i} to a number.",
             "code": f"def add_{i}(x):\n    return x + {i}",
             "test_list": [f"assert add_{i}(1) == {i + 1}", f"assert add_{i}(-{i}) == 0"],
             "test_setup_code": "", "challenge_test_list": []} for i in range(start, start + n)]


def ultrachat_rows(start: int, n: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        prompt = f"Describe a walk in the park number {i} in two sentences."
        rows.append({"prompt": prompt, "prompt_id": f"{i:064x}",
                     "messages": [{"content": prompt, "role": "user"},
                                  {"content": "It was sunny. Birds sang.", "role": "assistant"}]})
    return rows


IFEVAL = [  # instructions whose checks use no network: punctuation, case, a word count (nltk's punkt_tab)
    {"key": 1000, "prompt": "Write a short note about tea without using any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 1001, "prompt": "Write two sentences about rain, all in lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 1002, "prompt": "Answer in fewer than 20 words: what is a river?",
     "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": "less than",
                                                                              "num_words": 20}]},
]


def write_datasets(cache: Path) -> None:
    """The four datasets the Llama 3.1 recipes and their lm-eval tasks read, in each repo's own layout."""
    write_snapshot(cache, "dataset", "openai/gsm8k", COMMIT, {
        "README.md": configs_readme({"main": {"train": "main/train-*", "test": "main/test-*"}}),
        "main/train-00000-of-00001.parquet": parquet(gsm8k_rows(0, 40)),
        "main/test-00000-of-00001.parquet": parquet(gsm8k_rows(1000, 12))})
    write_snapshot(cache, "dataset", "google-research-datasets/mbpp", COMMIT, {
        "README.md": configs_readme({"full": {"train": "full/train-*", "test": "full/test-*"}}),
        "full/train-00000-of-00001.parquet": parquet(mbpp_rows(601, 30)),
        "full/test-00000-of-00001.parquet": parquet(mbpp_rows(11, 8))})
    write_snapshot(cache, "dataset", "HuggingFaceH4/ultrachat_200k", COMMIT, {
        "README.md": configs_readme({"default": {"train_sft": "data/train_sft-*", "test_sft": "data/test_sft-*"}}),
        "data/train_sft-00000-of-00001.parquet": parquet(ultrachat_rows(0, 60)),
        "data/test_sft-00000-of-00001.parquet": parquet(ultrachat_rows(5000, 5))})
    write_snapshot(cache, "dataset", "google/IFEval", COMMIT, {
        "ifeval_input_data.jsonl": "".join(json.dumps(r) + "\n" for r in IFEVAL)})


MODELS = {  # what the Llama 3.1 recipes name, by template family
    "meta-llama/Llama-3.1-8B": (LLAMA31, False), "meta-llama/Llama-3.1-70B": (LLAMA31, False),
    "meta-llama/Llama-3.1-405B-Instruct-FP8": (LLAMA31, False),
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": (SKYWORK, True)}


def write_hub(cache: Path) -> Path:
    for seed, (repo_id, (template, classifier)) in enumerate(MODELS.items()):
        write_model(cache, repo_id, template, seed, classifier)
    write_datasets(cache)
    return cache


TEXT = ("The river ran past the old mill. Dr. Smith walked along it every morning. He counted the boats. "
        "Some days there were none. Other days there were many! Was the water cold? It was, in winter. "
        "The mill stood empty. Children played near it in summer. Mr. Jones sold bread at the corner. ") * 20


def write_punkt_tab(nltk_data: Path) -> Path:
    """nltk's punkt_tab for English, trained here on a paragraph (the real one is trained on a corpus and fetched
    from nltk's data server): what ifeval's sentence and word checks load."""
    import nltk
    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params

    if str(nltk_data) not in nltk.data.path:  # nltk writes only under its data roots
        nltk.data.path.append(str(nltk_data))
    trainer = PunktTrainer()
    trainer.train(TEXT, finalize=True)
    folder = nltk_data / "tokenizers" / "punkt_tab" / "english"
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_punkt_params(trainer.get_params(), dir=str(folder))
    return nltk_data
