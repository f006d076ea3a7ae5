import re
from pathlib import Path

import pytest

from alignment.cli import main as align
from alignment.config import InputError, load_recipe

RECIPES = sorted(Path("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    assert load_recipe(path).name


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def tiny_with(tmp_path, old, new):
    text = Path("recipes/tiny.yaml").read_text()
    assert old in text
    return write(tmp_path, text.replace(old, new))


def test_unknown_key_names_file_line_and_path(tmp_path):
    p = tiny_with(tmp_path, "  num_samples: 4", "  num_samples: 4\n  num_sampels: 8")
    line = next(i for i, s in enumerate(p.read_text().splitlines(), 1) if s.startswith("  num_sampels: 8"))
    with pytest.raises(InputError) as e:
        load_recipe(p)
    assert str(e.value) == f"{p}:{line}: sampling.num_sampels: unknown key"


def test_wrong_type_names_file_line_path_and_value(tmp_path):
    p = tiny_with(tmp_path, "  beta: 0.1 ", "  beta: high ")
    line = next(i for i, s in enumerate(p.read_text().splitlines(), 1) if s.startswith("  beta: high"))
    with pytest.raises(InputError, match=rf"^{p}:{line}: dpo.beta: Input should be a valid number.*'high'"):
        load_recipe(p)


def test_out_of_range_and_missing_keys(tmp_path):
    p = tiny_with(tmp_path, "  beta: 0.1 ", "  beta: -1 ")
    with pytest.raises(InputError, match=r"dpo.beta: Input should be greater than 0"):
        load_recipe(p)
    p = tiny_with(tmp_path, "  max_new_tokens: 16 ", "  ")
    with pytest.raises(InputError, match=r"sampling.max_new_tokens: required key is missing"):
        load_recipe(p)


def test_bad_regex_is_caught_before_any_work(tmp_path):
    p = tiny_with(tmp_path, 'answer_regex: "=\\\\s*(-?\\\\d+)', 'answer_regex: "=\\\\s*((-?\\\\d+)')
    line = next(i for i, s in enumerate(p.read_text().splitlines(), 1) if "answer_regex" in s)
    with pytest.raises(InputError, match=rf"^{p}:{line}: reward.verifiers.0.answer_regex: does not compile"):
        load_recipe(p)


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "name: x\nsft: [1, 2\nseed: 0\n")
    with pytest.raises(InputError, match=rf"^{p}:\d: not valid YAML"):
        load_recipe(p)


@pytest.mark.parametrize("text,message", [
    ("name: x\nloop: &a [*a]\n", "YAML nested too deeply"),  # an alias inside its own anchor
    ("name: x\n? [a, b]\n: 1\n", "not valid YAML"),  # a sequence as a key: no key path can name it
])
def test_yaml_that_cannot_be_a_recipe_is_named_not_a_traceback(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(InputError, match=rf"^{p}(:\d+)?: {message}"):
        load_recipe(p)


def test_overrides_apply_and_errors_point_at_the_command_line():
    r = load_recipe("recipes/tiny.yaml", ["sft.learning_rate=5e-4", "sampling.num_samples=8"])
    assert (r.sft.learning_rate, r.sampling.num_samples) == (5e-4, 8)
    with pytest.raises(InputError, match=r"^command-line override: sft.learnig_rate: unknown key$"):
        load_recipe("recipes/tiny.yaml", ["sft.learnig_rate=5e-4"])
    with pytest.raises(InputError, match="expected key.path=value"):
        load_recipe("recipes/tiny.yaml", ["sft.learning_rate"])


def test_an_override_indexes_a_list_by_number():
    r = load_recipe("recipes/llama3.1-8b.yaml", ["prompts.sources.1.count=2", "prompts.num_prompts=10",
                                                 "prompts.eval_path.0.split=validation"])
    # weights 0.3 and 0.7 share the 8 left after the count: 2.4 and 5.6, by largest remainders 2 and 6
    assert r.prompts.quotas(1) == [2, 2, 6] and r.prompts.eval_path[0].split == "validation"
    assert r.prompts.eval_path[1].split == "test"  # the other item untouched
    with pytest.raises(InputError, match=r"prompts.sources.3: the list has 3 items \(0 to 2\)"):
        load_recipe("recipes/llama3.1-8b.yaml", ["prompts.sources.3.count=2"])
    with pytest.raises(InputError, match=r"^command-line override: prompts.sources.0.cuont: unknown key$"):
        load_recipe("recipes/llama3.1-8b.yaml", ["prompts.sources.0.cuont=2"])


def test_cli_prints_one_clear_message_without_traceback(tmp_path, capsys):
    p = tiny_with(tmp_path, "  num_samples: 4", "  num_samples: four")
    with pytest.raises(SystemExit) as e:
        align(["validate", str(p)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sampling.num_samples" in err and f"{p}:" in err


@pytest.mark.parametrize("override, message", [
    ("sft.num_processes=2", "num_processes > 1 needs distributed"),
    ("sft.learning_rate=2.0", "learning_rate"),
    ("dpo.beta=0", "beta"),
    ("sft.average_seeds=[3]", "two or more distinct seeds"),
    ("dpo.attn_implementation=flash", "attn_implementation"),
    ("reward.reward_model={source: path}", "model_name_or_path is required when source is 'path'"),
    ("reward.reward_model={source: trained, model_name_or_path: m}", "and only then"),
    ("reward.reward_model={model_name_or_path: trained}", "write `source: trained`"),
])
def test_bad_training_settings_are_named(override, message):
    with pytest.raises(InputError, match=message) as e:
        load_recipe("recipes/tiny.yaml", [override])
    assert override.split(".")[0] in str(e.value)  # the section or key it is in


@pytest.mark.parametrize("override, message", [
    ("sft.distributed=zero3", "sft.distributed: zero3 shards weights over GPUs and this machine has none"),
    ("dpo.distributed=fsdp", "dpo.distributed: fsdp shards weights over GPUs"),
    ("sft.lora={quantize_base_4bit: true}", r"sft.lora.quantize_base_4bit \(QLoRA\) needs a CUDA GPU"),
    ("sft.attn_implementation=flex_attention", "sft.attn_implementation: flex_attention trains on CUDA GPUs only"),
])
def test_training_this_machine_cannot_run_fails_before_any_work(override, message, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        align(["round", "1", "--recipe", "recipes/tiny.yaml", override, f"runs_dir={tmp_path}"])
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # nothing started
    align(["validate", "recipes/tiny.yaml", override])  # the recipe itself is fine: it names the problem
    assert re.search(message, capsys.readouterr().out)


def test_a_max_length_shorter_than_the_prompts_is_named(tmp_path):
    from alignment.chat import build_tokenizer
    from alignment.training import check_prompts_fit

    rows = [{"prompt": [{"role": "user", "content": "What is 12 + 7?"}]},
            {"prompt": [{"role": "user", "content": "x" * 100}]}]
    tok = build_tokenizer()
    # the second prompt renders to 123 tokens: BOS, two headers (1 + 4 or 9 characters + 1 + 2 newlines), the
    # 100 characters and one end-of-turn: 1 + (1 + 4 + 1 + 2) + 100 + 1 + (1 + 9 + 1 + 2)
    with pytest.raises(InputError, match=r"sft.max_length=64 .* 1 of 2 rows of data.jsonl \(row 2: 123 tokens"):
        check_prompts_fit(tok, rows, 64, "sft.max_length", "data.jsonl")
    check_prompts_fit(tok, rows, 124, "sft.max_length", "data.jsonl")  # fits: no error


def test_a_trained_reward_model_needs_the_stage_that_trains_it():
    with pytest.raises(InputError, match="reward.reward_model.source is 'trained' but the recipe has no "
                       "reward_training"):
        load_recipe("recipes/tiny.yaml", ["reward.reward_model={source: trained}", "reward_training=null"])
    assert load_recipe("recipes/tiny.yaml", ["reward.reward_model={source: trained}"]).reward.reward_model.source \
        == "trained"
