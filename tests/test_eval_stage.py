"""The eval stage on the transformers backend: its answers go through the generation backends with generate's
request, seed and shard code (so batching and resuming change nothing), the reward model is loaded once per stage,
and the optional pairwise judge cancels a judge's position bias."""

import json
import re
import threading
from contextlib import nullcontext
from http.server import ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignment import rewards
from alignment.backends.hf import TransformersBackend
from alignment.chat import build_tokenizer
from alignment.config import InputError, PairJudgeConfig, load_recipe
from alignment.judge import pair_wins
from alignment.lm_eval_tasks import run_lm_eval
from alignment.prompts import read_prompts
from alignment.stage_table import StageConfig, stage_config
from alignment.stages import eval as eval_stage
from alignment.tiny_models import random_llama, save

from test_generate import Scripted

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
PAIR = PairJudgeConfig(template="Q: {prompt} | A: {response_a} | B: {response_b}")


def varied_llama(tok, seed: int):
    """A random Llama with weights of std 0.3: its greedy answers vary with the prompt and the seed (the default
    initialisation writes one repeated token whatever it is asked)."""
    model, g = random_llama(tok, seed=seed, **SHAPE), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three different random Llamas (input, sft, dpo), a random one-label reward model, 6 held-out prompts."""
    tmp = tmp_path_factory.mktemp("eval")
    tok = build_tokenizer()
    paths = {name: save(varied_llama(tok, i), tok, tmp / name) for i, name in enumerate(
        ("input", "sft", "dpo"))}
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)).save_pretrained(tmp / "rm")
    tok.save_pretrained(tmp / "rm")
    return tmp, paths, tmp / "rm", read_prompts(ROOT / "data/arithmetic/eval.jsonl")[:6]


def stage(*overrides) -> StageConfig:
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", ["eval.lm_eval_tasks=[]", "eval.num_samples=3",
                                                       "eval.pass_k=[1,2]", "eval.max_new_tokens=8", *overrides])
    return StageConfig("eval", stage_config(recipe, "eval"))


def run_eval(recipe, models, out: Path, rm=None, teacher=None):
    tmp, paths, _, prompts = models
    eval_prompts = tmp / "prompts.jsonl"
    eval_prompts.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out.mkdir(parents=True, exist_ok=True)
    inputs = {**paths, "eval_prompts": eval_prompts, **({"reward_model": rm} if rm else {}),
              **({"teacher": teacher} if teacher else {})}
    eval_stage.run(recipe, inputs, out, 1)
    return (json.loads((out / "metrics.json").read_text()),
            [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()])


def test_eval_answers_do_not_depend_on_batching_or_resuming(models, tmp_path):
    first = run_eval(stage("eval.batch_size=6"), models, tmp_path / "a")
    assert len({r["response"] for r in first[1]}) > 3  # three random models write different answers
    # another batch size, and a stage that died with half of its requests saved: the same answers and samples
    parts = sorted((tmp_path / "a/shards").glob("part-*.jsonl"))
    lines = [line for p in parts for line in p.read_text().splitlines()]
    (tmp_path / "b/shards").mkdir(parents=True)
    (tmp_path / "b/shards/part-00000.jsonl").write_text("\n".join(lines[:len(lines) // 2]) + "\n")
    second = run_eval(stage("eval.batch_size=1"), models, tmp_path / "b")
    assert second == first
    saved = [json.loads(line) for p in sorted((tmp_path / "b/shards").glob("part-*.jsonl"))
             for line in p.read_text().splitlines()]
    assert len(saved) == len(lines) and len({r["request_id"] for r in saved}) == len(lines)  # none sent twice


def test_the_reward_model_is_loaded_once_per_stage(models, tmp_path, monkeypatch):
    _, _, rm, _ = models
    loads, init = [], rewards.RewardModel.__init__

    def counted(self, *args, **kw):
        loads.append(args)
        init(self, *args, **kw)

    monkeypatch.setattr(rewards.RewardModel, "__init__", counted)
    metrics, answers = run_eval(stage(f"reward.reward_model.model_name_or_path={rm}"), models, tmp_path, rm=str(rm))
    assert len(loads) == 1  # three models, greedy and sampled answers: one load
    # the scores are the reward model's own, computed here conversation by conversation without padding
    tok, model = build_tokenizer(), LlamaForSequenceClassification.from_pretrained(rm).eval()
    prompts = {p["prompt_id"]: p for p in models[3]}
    for row in answers:
        text = tok.apply_chat_template(prompts[row["prompt_id"]]["messages"] + [
            {"role": "assistant", "content": row["response"]}], tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, 0].item()
        assert row["scores"]["reward_model"] == pytest.approx(expected, abs=1e-5)


def test_pair_wins_cancels_position_bias_and_counts_unreadable_verdicts():
    assert pair_wins(PAIR, "Winner: A", "winner: a") == 0.5  # always the first answer: no gain for either
    assert pair_wins(PAIR, "Winner: A", "Winner: B") == 1.0 and pair_wins(PAIR, "Winner: B", "Winner: A") == 0.0
    assert pair_wins(PAIR, "Winner: tie", "Winner: B") == 0.75
    assert pair_wins(PAIR, "no verdict", "Winner: B") == 1.0  # one readable order counts alone
    assert pair_wins(PAIR, "no verdict", "Winner: C") is None


def test_judge_win_rate_against_the_input_model(models, tmp_path):
    """The teacher at an OpenAI-compatible endpoint, with verdicts we control: it prefers the answer of the model
    named `sft` (found by its text), whichever position it is in; between the others it always says A."""
    _, paths, _, prompts = models
    first = run_eval(stage(), models, tmp_path / "plain")
    sft_answers = {r["response"] for r in first[1] if r["model"] == "sft"}
    input_answers = {r["response"] for r in first[1] if r["model"] == "input"}

    def verdict(body, i):
        text = body["messages"][0]["content"]
        a, b = text.split(" | A: ")[1].split(" | B: ")
        if a in sft_answers and a not in input_answers:
            return "Winner: A"
        return "Winner: B" if b in sft_answers and b not in input_answers else "I think... Winner: A"

    Scripted.script, Scripted.models, Scripted.seen, Scripted.text = [], ["teacher"], [], staticmethod(verdict)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        recipe = stage("teacher.source=path", "teacher.model_name_or_path=teacher", "teacher.backend=openai",
                       f"teacher.endpoints=[http://127.0.0.1:{httpd.server_address[1]}/v1]",
                       "eval.backend=transformers", f"eval.judge.template={PAIR.template!r}")
        metrics, answers = run_eval(recipe, models, tmp_path / "judged", teacher="teacher")
    finally:
        httpd.shutdown()
    # a prompt where sft's answer differs from input's is a win in both orders; elsewhere the judge's A-bias cancels
    differs = [a["response"] != b["response"] for a, b in zip(
        [r for r in answers if r["model"] == "sft"], [r for r in answers if r["model"] == "input"])]
    assert metrics["sft"]["judge_win_rate_vs_input"] == pytest.approx((sum(differs) + 0.5 * (6 - sum(differs))) / 6)
    assert metrics["dpo"]["judge_win_rate_vs_input"] == 0.5 and metrics["dpo"]["judge_unjudged_prompts"] == 0
    assert "judge_win_rate_vs_input" not in metrics["input"]
    assert answers == first[1]  # the judge adds metrics, it changes no answer
    assert 0 < len(Scripted.seen) <= 2 * 2 * 6  # two checkpoints, two orders, six prompts (repeats sent once)


# The answer both our verifier and the lm-eval task read in these tests: the last integer of the response (a
# random model never ends "= <answer>" as the tiny recipe's verifier asks). One regex, one possible match.
LAST_INTEGER = r"(-?\d+)\D*$"
VERIFIER = f"reward.verifiers=[{{name: arithmetic, kind: answer, answer_regex: '{LAST_INTEGER}', match: exact}}]"


def task_answered_by(tmp: Path, prompts: list[dict], texts: list[str]) -> tuple[list[dict], Path, float]:
    """The held-out prompts with every other answer replaced by the last integer of the model's own greedy answer
    (where it wrote one), and an lm-eval task reading them with that rule: the expected accuracy is known, not 0."""
    rows, hits = [], 0
    for i, (p, text) in enumerate(zip(prompts, texts)):
        found = re.search(LAST_INTEGER, text)
        if i % 2 == 0 and found:
            p, hits = {**p, "answer": found.group(1)}, hits + 1
        rows.append(p)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = yaml.safe_load((ROOT / "recipes/lm_eval/arithmetic_local.yaml").read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(tmp / "eval.jsonl")
    task["filter_list"][0]["filter"][0]["regex_pattern"] = LAST_INTEGER
    (tmp / "arithmetic_local.yaml").write_text(yaml.safe_dump(task))
    return rows, tmp, hits / len(rows)


def as_lm_eval_decodes(text: str) -> str:
    """An answer as lm-eval's decoders write it: without any special token. Ours keep <|python_tag|>, which opens a
    tool call (alignment.template.decode_response), and a random model writes now and then."""
    return text.replace("<|python_tag|>", "")


def lm_eval_against_eval(recipe_overrides, backend, path: Path, prompts, tmp: Path):
    """Eval's greedy answers (as lm-eval decodes them) and accuracy, and lm-eval's answers and exact match, on one
    open backend, on a task whose expected accuracy is known: (ours, lm-eval's, our accuracy, lm-eval's,
    expected)."""
    recipe = stage(*recipe_overrides, VERIFIER, "eval.max_new_tokens=16", "eval.num_samples=0")
    with mock.patch.object(eval_stage, "open_backend", lambda *a: nullcontext(backend)):
        first, _, _ = eval_stage.answers(recipe, path, prompts, tmp / "first")
        rows, include, expected = task_answered_by(tmp / "task", prompts, [c.text for c in first])
        recipe = stage(*recipe_overrides, VERIFIER, "eval.max_new_tokens=16", "eval.num_samples=0",
                       "eval.lm_eval_tasks=[arithmetic_local]", f"eval.lm_eval_include_path={include}",
                       f"eval.lm_eval_limit={len(prompts)}")
        greedy, _, lm = eval_stage.answers(recipe, path, rows, tmp / "second")
        logged = run_lm_eval(recipe, backend, path, log_samples=True)["samples"]["arithmetic_local"]
    ours, _ = eval_stage.model_metrics(recipe, rows, "m", (greedy, None, {}), None)
    return ([as_lm_eval_decodes(c.text) for c in greedy],
            [s["resps"][0][0] for s in sorted(logged, key=lambda s: s["doc_id"])],
            ours["accuracy"], lm["lm_eval/arithmetic_local/exact_match,final_answer"], expected)


@pytest.mark.slow  # lm-eval's run: about 6 s
def test_lm_eval_on_the_transformers_model_writes_and_scores_eval_answers(models, tmp_path):
    _, paths, _, prompts = models
    backend = TransformersBackend(str(paths["sft"]), batch_size=6, shard_size=6)
    ours, theirs, accuracy, lm_accuracy, expected = lm_eval_against_eval([], backend, paths["sft"], prompts, tmp_path)
    assert expected > 0 and theirs == ours and accuracy == lm_accuracy == expected


def test_eval_serves_on_the_teachers_backend_unless_it_names_its_own():
    endpoints = ["teacher.source=path", "teacher.model_name_or_path=t", "teacher.backend=openai",
                 "teacher.endpoints=[http://node1:8000/v1]", "teacher.api_key_env=KEY"]
    s = eval_stage.serving(stage(*endpoints))
    # this run's checkpoints are not at the teacher's endpoints: a server started per model, on loopback, no key
    assert (s.backend.value, s.serve, s.endpoints, s.api_key_env) == ("openai", True, [], None)
    s = eval_stage.serving(stage(*endpoints, "eval.backend=vllm", "eval.engine={tensor_parallel_size: 2}"))
    assert (s.backend.value, s.serve, s.engine.tensor_parallel_size) == ("vllm", False, 2)
    s = eval_stage.serving(stage("teacher.backend=vllm", "teacher.engine.tensor_parallel_size=4"))
    assert (s.backend.value, s.engine.tensor_parallel_size, s.batch_size) == ("vllm", 4, 150)  # eval's batch size


@pytest.mark.parametrize("override, message", [
    ("eval.judge={template: '{prompt} {response_a}'}", "eval.judge.template: lacks the placeholders ['{response_b}']"),
    ("eval.judge={template: '{prompt} {response_a} {response_b}', verdict_regex: '(A)|(B)'}",
     "eval.judge.verdict_regex: needs exactly one group (the verdict), it has 2"),
])
def test_a_judge_template_or_regex_that_cannot_work_is_refused_before_any_work(override, message):
    with pytest.raises(InputError, match=re.escape(message)):
        stage(override)
    assert stage("eval.judge={template: '{prompt} {response_a} {response_b}'}").eval.judge is not None


@pytest.mark.parametrize("recipe, overrides, message", [
    ("recipes/llama3.1-8b.yaml", ["eval.engine=null"], "eval.engine: null takes the teacher's engine, whose "
     "quantization fbgemm_fp8"),
    ("recipes/llama3.1-8b.yaml", ["eval.backend=vllm"], "engine.data_parallel_size > 1 needs a server"),
    ("recipes/tiny.yaml", ["eval.backend=vllm", "eval.engine={data_parallel_size: 2}"], "needs a server"),
])
def test_an_eval_engine_that_cannot_serve_the_rounds_checkpoints_is_refused(recipe, overrides, message):
    with pytest.raises(InputError, match=re.escape(message)):
        load_recipe(ROOT / recipe, overrides)
    load_recipe(ROOT / recipe)  # as shipped: eval sets its own bf16 engine, served with data parallelism
    load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["eval.engine=null", "eval.backend=transformers"])


def test_teacher_eval_serves_the_teacher_on_the_teachers_engine(models, tmp_path, monkeypatch):
    """The 8B recipe's 405B FP8 teacher needs tensor parallel 8 with its FP8 scales (teacher.engine); eval's engine
    (tensor parallel 1, data parallel 8, bf16) is for the 8B checkpoints and would load all 405B on each GPU. The
    engine each stage opens, recorded at open_backend; the reward model stays on eval's engine in both stages, so
    the teacher's scores and the rounds' compare."""
    from alignment.backends import Result
    from alignment.backends.base import Completion
    from alignment.stages import teacher_eval

    tmp, paths, _, prompts = models
    opened, scored_on = [], []

    class Answers:
        retries = 0

        def generate(self, requests):
            for i, q in enumerate(requests):
                yield i, Result([Completion("Answer: 1", 3, "stop")] * q.n, 5)

    def fake_backend(cfg, model, log_dir):
        opened.append(cfg)
        return nullcontext(Answers())

    real_rm = rewards.open_reward_model

    def recorded_rm(cfg, path, engine):
        scored_on.append(engine)
        return real_rm(cfg, path, engine)

    monkeypatch.setattr(eval_stage, "open_backend", fake_backend)
    monkeypatch.setattr(rewards, "open_reward_model", recorded_rm)
    recipe = load_recipe(ROOT / "recipes/llama3.1-8b.yaml", ["eval.lm_eval_tasks=[]"])
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    inputs = {"teacher": paths["input"], "eval_prompts": tmp_path / "prompts.jsonl"}
    teacher_eval.run(StageConfig("teacher_eval", stage_config(recipe, "teacher_eval")), inputs, tmp_path / "t", 0)
    (served,) = opened
    assert served.engine == recipe.teacher.engine  # tensor parallel 8, fbgemm_fp8, as generate serves it
    assert (served.engine.tensor_parallel_size, served.engine.quantization) == (8, "fbgemm_fp8")
    assert (served.backend.value, served.serve, served.batch_size) == ("openai", True, recipe.eval.batch_size)
    assert scored_on == [recipe.eval.engine]
    opened.clear(), scored_on.clear()
    run_eval(StageConfig("eval", stage_config(recipe, "eval")), models, tmp_path / "e")
    assert opened and all(s.engine == recipe.eval.engine for s in opened)  # the checkpoints: eval's own engine
    assert scored_on == [recipe.eval.engine]
