"""The Llama 3.1 recipes cannot run on this machine; what can be checked is that they validate, carry the
paper's numbers, and spell out every model, file and engine setting they need (no default, no "latest")."""

from pathlib import Path

import pytest
import yaml

from alignment.cli import main as align
from alignment.config import Backend, InputError, ModelSource, load_recipe

RECIPES = ["recipes/llama3.1-8b.yaml", "recipes/llama3.1-70b.yaml"]


def written(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


@pytest.mark.parametrize("path", RECIPES)
def test_paper_settings(path):
    r = load_recipe(path)
    assert r.rounds == 6
    assert 10 <= r.sampling.num_samples <= 30
    assert r.sft.learning_rate == r.dpo.learning_rate == 1e-5
    assert r.dpo.beta == 0.1
    assert dict(zip(r.dpo.loss_type, r.dpo.loss_weights)) == {"sigmoid": 1.0, "sft": 0.2}
    t = r.teacher
    assert t.model_name_or_path == "meta-llama/Llama-3.1-405B-Instruct-FP8"
    assert t.backend == Backend.openai and t.serve
    assert t.engine.tensor_parallel_size == 8 and t.engine.quantization == "fbgemm_fp8"
    for train in (r.sft, r.dpo):  # full weights of 8B and 70B do not fit one GPU with their optimizer state
        assert train.distributed == "fsdp" and train.num_processes == 8
    assert r.dpo.mask_formatting_tokens and r.sft.packing


@pytest.mark.parametrize("path", RECIPES)
def test_every_path_and_engine_setting_is_written_out(path):
    y = written(path)
    r = load_recipe(path)
    assert r.student.source == ModelSource.path and y["student"]["model_name_or_path"]
    assert r.teacher.source == ModelSource.path  # a fixed teacher, named
    # prompts from public Hub datasets, each with its split, its columns and a revision key (null: pinned per run)
    sources = [m["source"] for m in y["prompts"]["sources"]] + y["prompts"]["eval_path"]
    assert {s["dataset"] for s in sources} == {"openai/gsm8k", "google-research-datasets/mbpp",
                                               "HuggingFaceH4/ultrachat_200k"}
    for s in sources:
        assert {"dataset", "split", "revision", "columns"} <= set(s), s
    assert {s.get("capability") for s in sources} == {"math", "code", None}  # None: the default system prompt
    assert y["reward"]["reward_model"]["model_name_or_path"]
    assert "runs_dir" in y
    # every engine and transport setting of the teacher is in the file, not left to a default
    assert set(y["teacher"]["engine"]) == set(type(r.teacher.engine).model_fields) - {"enable_chunked_prefill"}
    for key in ("serve", "server_port", "max_concurrency", "request_timeout_s", "max_retries", "system_prompts"):
        assert key in y["teacher"], key
    # every field of every section without a default-free meaning is written
    for section in ("sampling", "sft", "dpo", "eval", "gate"):
        fields = set(type(getattr(r, section)).model_fields) - {"report_to"}
        assert fields <= set(y[section]), (section, fields - set(y[section]))


@pytest.mark.parametrize("path", RECIPES)
def test_validate_offline_names_the_first_dataset_it_cannot_fetch(path, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit):
        align(["validate", path])
    err = capsys.readouterr().err
    assert err.startswith("error: prompt source openai/gsm8k/main@main split train: cannot fetch the Hub dataset")


def test_a_round_past_the_planned_ones_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        align(["round", "3", "--recipe", "recipes/tiny.yaml", "rounds=2", f"runs_dir={tmp_path}"])
    assert "round 3: the recipe plans 2 rounds" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


LOOSE = "To calculate 32 + 0, you simply add 0 to 32."  # what the old default verifier counted as 32


@pytest.mark.parametrize("path", [*RECIPES, "recipes/tiny.yaml"])
def test_every_shipped_answer_verifier_requires_an_explicit_final_answer(path):
    from alignment.verifiers import answer_matches, check_examples

    r = load_recipe(path)
    check_examples(r.reward.verifiers, r.teacher.system_prompts)  # each accepts its own example
    for v in r.reward.verifiers:
        if v.kind == "answer":
            assert answer_matches(LOOSE, "32", v) == 0.0, v.name


@pytest.mark.parametrize("path", RECIPES)
def test_the_math_prompt_and_the_math_verifier_agree(path):
    from alignment.verifiers import answer_matches

    r = load_recipe(path)
    math = next(v for v in r.reward.verifiers if v.name == "math")
    assert "'Answer: <answer>'" in r.teacher.system_prompts["math"]
    # a sample that obeys the prompt scores 1; the old \boxed{} format (which the prompt never asks for) scores 0
    assert answer_matches("Half of 48 is 24.\nAnswer: 24", "24", math) == 1.0
    assert answer_matches("Half of 48 is \\boxed{24}.", "24", math) == 0.0


@pytest.mark.parametrize("path", RECIPES)
def test_a_math_verifier_that_disagrees_with_its_system_prompt_is_refused_before_any_work(path):
    from alignment.verifiers import check_examples

    # the recipes as they shipped before: the prompt asks for 'Answer: <answer>', the regex reads \boxed{}
    r = load_recipe(path)
    math, code = r.reward.verifiers
    boxed = math.model_copy(update={"answer_regex": r"\\boxed\{([^}]*)\}"})
    with pytest.raises(InputError, match=r"reward.verifiers\[0\] \(math\): rejects its own example: answer_regex "
                                         r".*boxed.* reads None from example.response, expected '24'"):
        check_examples([boxed, code], r.teacher.system_prompts)
    with pytest.raises(InputError, match=r"reward.verifiers\[0\] \(math\).example: required, since "
                                         r"teacher.system_prompts\['math'\] asks for a format"):
        check_examples([math.model_copy(update={"example": None}), code], r.teacher.system_prompts)


def test_a_code_verifier_whose_example_fails_its_tests_is_refused():
    from alignment.sandbox import isolation_problem
    from alignment.verifiers import check_examples

    if isolation_problem():
        pytest.skip(isolation_problem())
    r = load_recipe(RECIPES[0])
    math, code = r.reward.verifiers
    code = code.model_copy(update={"example": code.example.model_copy(update={"tests": "assert add(2, 3) == 6"})})
    with pytest.raises(InputError, match=r"\(code\): rejects its own example: the code in example.response passes "
                                         r"0 of 1 of example.tests"):
        check_examples([math, code], r.teacher.system_prompts)


@pytest.mark.parametrize("source", ["previous", "bootstrap"])
def test_a_teacher_path_that_its_source_never_reads_is_an_error(source):
    with pytest.raises(InputError, match=f"teacher.model_name_or_path is set but source '{source}' never reads it"):
        load_recipe("recipes/tiny.yaml", [f"teacher={{source: {source}, model_name_or_path: org/m}}"])
