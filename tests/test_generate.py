"""Generate-stage pieces that need no engine: request building and dedup, system prompts, shards, teacher config,
and the OpenAI client's retry and error behaviour against a scripted HTTP server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignment.backends import GenerationError, Request
from alignment.backends.openai_client import OpenAIBackend
from alignment.config import InputError, TeacherConfig, load_recipe
from alignment.stage_table import hashed_config, stage_config
from alignment.shards import ShardWriter, load_shards
from alignment.prompts import system_prompt_for
from alignment.stages.generate import build_requests

TINY = Path("recipes/tiny.yaml")


def prompt(pid, text, capability=None, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"prompt_id": pid, "messages": msgs, **({"capability": capability} if capability else {})}


def seeds_by_prompt(prompts: list[dict], recipe) -> dict[str, tuple[str, int]]:
    """{prompt_id: (request_id, seed)}, joined by prompt_id: what each prompt is sent as, wherever it stands."""
    ids, requests, _ = build_requests(prompts, recipe, "teacher-x", base_seed=7)
    return {p["prompt_id"]: (rid, requests[rid].seed) for p, rid in zip(prompts, ids)}


def test_identical_conversations_become_one_request_with_a_stable_seed():
    recipe = load_recipe(TINY)
    prompts = [prompt("a", "What is 1 + 1?"), prompt("b", "What is 2 + 2?"), prompt("c", "What is 1 + 1?")]
    ids, requests, _ = build_requests(prompts, recipe, "teacher-x", base_seed=7)
    assert ids[0] == ids[2] != ids[1]
    assert len(requests) == 2
    assert requests[ids[0]].n == recipe.sampling.num_samples
    # the seed belongs to the request: the same request in another order or company gets the same seed. Every
    # prompt moves (a rotation: none keeps its position), and each is compared
    rotated = prompts[1:] + prompts[:1]
    assert [p["prompt_id"] for p in rotated] == ["b", "c", "a"]
    seeds = seeds_by_prompt(prompts, recipe)
    assert seeds_by_prompt(rotated, recipe) == seeds and seeds_by_prompt(prompts[1:2], recipe) == {"b": seeds["b"]}
    assert seeds["a"][1] != seeds["b"][1]
    # another round (base seed), teacher or sampling setting is another request
    assert build_requests(prompts, recipe, "teacher-x", base_seed=8)[0][0] != ids[0]
    assert build_requests(prompts, recipe, "teacher-y", base_seed=7)[0][0] != ids[0]


def test_system_prompt_by_capability_with_default_and_existing_system_message_kept():
    sp = {"math": "Show the sum.", "default": "Be brief."}
    assert system_prompt_for(prompt("a", "q", "math"), sp) == "Show the sum."
    assert system_prompt_for(prompt("b", "q", "code"), sp) == "Be brief."
    assert system_prompt_for(prompt("c", "q"), sp) == "Be brief."
    assert system_prompt_for(prompt("d", "q", "math", system="Own prompt."), sp) is None
    assert system_prompt_for(prompt("e", "q", "code"), {"math": "x"}) is None


def test_system_prompt_is_sent_but_recorded_apart():
    recipe = load_recipe(TINY, ['teacher.system_prompts={"math": "Answer with the sum."}'])
    ids, requests, systems = build_requests([prompt("a", "What is 1 + 1?", "math")], recipe, "t", base_seed=0)
    assert requests[ids[0]].messages[0] == {"role": "system", "content": "Answer with the sum."}
    assert systems == {"a": "Answer with the sum."}


def test_shards_survive_a_kill_mid_line_and_a_new_run_appends_a_new_part(tmp_path):
    folder = tmp_path / "shards"
    with ShardWriter(folder) as w:
        w.write({"request_id": "r1", "completions": [["x", 1, "stop"]], "prompt_tokens": 3})
        w.write({"request_id": "r2", "completions": [["y", 1, "stop"]], "prompt_tokens": 3})
    with open(folder / "part-00000.jsonl", "a") as f:
        f.write('{"request_id": "r3", "compl')  # the process died while writing this line
    assert sorted(load_shards(folder)) == ["r1", "r2"]
    with ShardWriter(folder) as w:
        assert w.path.name == "part-00001.jsonl"
        w.write({"request_id": "r3", "completions": [["z", 1, "stop"]], "prompt_tokens": 3})
    assert sorted(load_shards(folder)) == ["r1", "r2", "r3"]
    with ShardWriter(folder):
        pass  # a run that finished nothing leaves no empty part
    assert len(list(folder.glob("part-*.jsonl"))) == 2


def test_damage_in_the_middle_of_a_shard_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-00000.jsonl").write_text('{"request_id": "r1", "completions": []}\nGARBAGE\n{"request_id": "r2"}\n')
    with pytest.raises(InputError, match=r"part-00000.jsonl:2"):
        load_shards(folder)


@pytest.mark.parametrize("fields, message", [
    ({"backend": "openai"}, "either endpoints"),
    ({"backend": "openai", "serve": True, "endpoints": ["http://h:1/v1"]}, "either endpoints"),
    ({"backend": "openai", "endpoints": ["h:8000"], "source": "path", "model_name_or_path": "m"}, "http"),
    ({"backend": "openai", "endpoints": ["http://h:1/v1"]}, "use serve: true"),
    ({"backend": "vllm", "engine": {"data_parallel_size": 2}}, "needs a server"),
    ({"backend": "transformers", "serve": True}, "openai' only"),
    ({"backend": "openai", "serve": True, "api_key_env": "MY-KEY"}, "api_key_env"),
])
def test_bad_teacher_settings_are_rejected(fields, message):
    cfg = {"source": "previous", **fields}
    with pytest.raises(ValueError, match=message):
        TeacherConfig.model_validate(cfg)


def test_transport_settings_do_not_invalidate_generation_but_sampling_does():
    base = hashed_config(stage_config(load_recipe(TINY), "generate"))
    moved = load_recipe(TINY, ["teacher.backend=openai", "teacher.serve=true", "teacher.max_concurrency=3",
                               "teacher.max_retries=9", "teacher.server_port=9999"])
    moved_config = stage_config(moved, "generate")
    assert moved_config["teacher"]["max_concurrency"] == 3  # the stage still reads them
    assert {k: v for k, v in hashed_config(moved_config)["teacher"].items() if k != "backend"} == \
        {k: v for k, v in base["teacher"].items() if k != "backend"}
    assert hashed_config(stage_config(load_recipe(TINY, ["sampling.temperature=0.5"]), "generate")) != base


def test_misspelt_system_prompt_capability_is_rejected_by_validate(capsys):
    from alignment.cli import main as align

    with pytest.raises(SystemExit):
        align(["validate", str(TINY), 'teacher.system_prompts={"mathh": "x"}'])
    assert "mathh" in capsys.readouterr().err


# --- the OpenAI client against a scripted server ---------------------------------------------------------------


class Scripted(BaseHTTPRequestHandler):
    """Answers /models with `models`, and /chat/completions with the next scripted status (then successes)."""

    script: list = []
    models = ["teacher"]
    seen: list = []
    text = staticmethod(lambda body, i: f"s{i}")  # the i-th choice's content for a request body
    hits_limit = staticmethod(lambda body, i: i == 0)  # whether the i-th choice ran to max_tokens
    token_ids = None  # (body, i) -> the i-th choice's token ids, as vLLM returns them; None: placeholder ids

    def log_message(self, *a):
        pass

    def reply(self, status, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply(200, {"data": [{"id": m} for m in self.models]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append((dict(self.headers), body))
        step = type(self).script.pop(0) if type(self).script else "ok"
        if step == "ok":
            n = body["n"]
            completions = not self.path.endswith("/chat/completions")  # vLLM's completions API: a prompt, a text
            self.reply(200, {"choices": [
                {"index": i, **({"text": self.text(body, i)} if completions else
                                {"message": {"content": self.text(body, i)}}),
                 "finish_reason": "length" if self.hits_limit(body, i) else "stop", "stop_reason": None,
                 "token_ids": self.token_ids(body, i) if self.token_ids else
                 [1] * (body["max_tokens"] if self.hits_limit(body, i) else 3)} for i in range(n)],
                "prompt_token_ids": [5, 6, 7]})
        elif step == "bad":
            self.reply(200, {"choices": []})
        elif step == "echo401":  # a careless server that echoes the credentials it refused
            self.reply(401, {"error": f"invalid key: {self.headers.get('Authorization')}"})
        else:
            self.reply(step, {"error": "scripted"})


@pytest.fixture
def server():
    Scripted.script, Scripted.models, Scripted.seen = [], ["teacher"], []
    Scripted.text = staticmethod(lambda body, i: f"s{i}")
    Scripted.hits_limit = staticmethod(lambda body, i: i == 0)
    Scripted.token_ids = None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def client(endpoints, **fields):
    cfg = TeacherConfig.model_validate({"source": "path", "model_name_or_path": "teacher", "backend": "openai",
                                        "endpoints": endpoints, "retry_backoff_s": 0.01, "max_retries": 2,
                                        "request_timeout_s": 5, **fields})
    return OpenAIBackend(endpoints, "teacher", cfg)


REQ = Request([{"role": "user", "content": "hi"}], n=3, temperature=1.0, top_p=1.0, max_tokens=8, seed=1)


def test_429_and_5xx_are_retried_and_counted_and_the_stop_token_is_not(server):
    Scripted.script = [429, 503]
    backend = client([server])
    (i, result), = list(backend.generate([REQ]))
    assert backend.retries == 2
    assert [c.text for c in result.completions] == ["s0", "s1", "s2"]
    # 8 tokens cut at the limit; 3 token ids ending with the end-of-turn token = 2 tokens of response
    assert [(c.num_tokens, c.finish_reason) for c in result.completions] == [(8, "length"), (2, "stop"), (2, "stop")]
    assert result.prompt_tokens == 3
    assert Scripted.seen[-1][1]["n"] == 3 and Scripted.seen[-1][1]["seed"] == 1


def test_malformed_answers_fail_after_the_retries_naming_the_endpoint(server):
    Scripted.script = ["bad"] * 3
    with pytest.raises(GenerationError, match=rf"after 2 retries.*{server}.*expected 3 choices"):
        list(client([server]).generate([REQ]))


def test_a_wrong_model_name_fails_before_any_request(server):
    Scripted.models = ["other-model"]
    with pytest.raises(GenerationError, match=r"serves \['other-model'\], not the teacher model 'teacher'"):
        client([server])
    assert Scripted.seen == []


def test_an_unreachable_endpoint_is_named(server):
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    with pytest.raises(GenerationError, match=r"http://127.0.0.1:9/v1.*cannot connect"):
        client([dead])


def test_a_4xx_answer_is_not_retried(server):
    Scripted.script = [400]
    backend = client([server])
    with pytest.raises(GenerationError, match="HTTP 400"):
        list(backend.generate([REQ]))
    assert backend.retries == 0


def test_requests_spread_over_endpoints_and_carry_the_key_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "s3cret")
    second = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=second.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{second.server_address[1]}/v1"
    try:
        backend = client([server, other], api_key_env="TEACHER_KEY", max_concurrency=4)
        results = dict(backend.generate([REQ] * 8))
    finally:
        second.shutdown()
    assert sorted(results) == list(range(8))
    assert all(h.get("Authorization") == "Bearer s3cret" for h, _ in Scripted.seen)
    ports = {h["Host"] for h, _ in Scripted.seen}
    assert len(ports) == 2


def test_a_missing_key_variable_is_named(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(GenerationError, match="NO_SUCH_KEY"):
        client([server], api_key_env="NO_SUCH_KEY")


def test_the_judge_grades_through_the_teacher_endpoint_and_counts_unreadable_verdicts(server, tmp_path):
    from alignment.config import JudgeConfig
    from alignment.judge import judge

    replies = {"4": "Right, and brief. Score: 3", "5": "Wrong sum. Score: 0", "22": "Score: 7", "?": "I cannot say."}
    Scripted.text = staticmethod(lambda body, i: replies[body["messages"][0]["content"].split("A: ")[1]])
    cfg = JudgeConfig(template="Q: {prompt}\nA: {response}", max_score=3)
    teacher = TeacherConfig.model_validate({"source": "path", "model_name_or_path": "teacher", "backend": "openai",
                                            "endpoints": [server], "retry_backoff_s": 0.01})
    q = [{"role": "user", "content": "2 + 2?"}]
    verdicts = judge(cfg, teacher, "teacher", [(q, "4"), (q, "5"), (q, "22"), (q, "?")], tmp_path)
    assert verdicts == [3, 0, None, None]  # 7 is outside the 0..3 rubric; no verdict at all is None too
    bodies = [b for _, b in Scripted.seen]
    assert sorted(b["messages"][0]["content"] for b in bodies) == sorted(f"Q: 2 + 2?\nA: {r}" for r in replies)
    assert all(b["n"] == 1 and b["temperature"] == 0.0 and b["max_tokens"] == cfg.max_new_tokens for b in bodies)


def test_a_key_a_server_echoes_is_cut_out_of_the_error(server, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "s3cret-value")
    Scripted.script = ["echo401"]
    with pytest.raises(GenerationError) as e:
        list(client([server], api_key_env="TEACHER_KEY").generate([REQ]))
    assert "HTTP 401 (check teacher.api_key_env)" in str(e.value) and "Bearer <api key>" in str(e.value)
    assert "s3cret-value" not in str(e.value)


@pytest.mark.parametrize("url", ["http://user:s3cret@h:8000/v1", "http://h:8000/v1?api_key=s3cret",
                                 "https://h/v1#s3cret"])
def test_an_endpoint_url_carrying_a_key_is_refused_without_echoing_it(url):
    with pytest.raises(InputError, match="without credentials or a query") as e:
        load_recipe(TINY, [f"teacher={{source: path, model_name_or_path: m, backend: openai, endpoints: ['{url}']}}"])
    assert "s3cret" not in str(e.value)  # the error a user sees does not print the key either


def test_only_the_stages_that_call_the_teacher_get_its_key(monkeypatch):
    from alignment.launcher import stage_env

    monkeypatch.setenv("TEACHER_KEY", "s3cret")
    recipe = load_recipe(TINY, ["teacher={source: path, model_name_or_path: m, backend: openai, serve: true, "
                                "api_key_env: TEACHER_KEY}"])
    assert stage_env(recipe, "generate")["TEACHER_KEY"] == "s3cret"
    for stage in ("score", "select", "sft", "dpo", "eval", "promote", "reward_training"):
        assert "TEACHER_KEY" not in stage_env(recipe, stage), stage
    judged = load_recipe(TINY, ["teacher={source: path, model_name_or_path: m, backend: openai, serve: true, "
                                "api_key_env: TEACHER_KEY}", "reward.judge={template: '{prompt} {response}'}"])
    assert stage_env(judged, "score")["TEACHER_KEY"] == "s3cret"  # the judge is the teacher


def test_a_tool_call_step_is_refused_by_the_openai_api_before_anything_is_sent(server):
    step = {"role": "assistant", "content": "<|python_tag|>x", "stop_reason": "end_of_message"}
    stepped = Request([{"role": "user", "content": "hi"}, step, {"role": "ipython", "content": "1"}], n=1,
                      temperature=1.0, top_p=1.0, max_tokens=8, seed=1)
    with pytest.raises(GenerationError, match="1 of 2 conversations hold a tool-call step .* OpenAI's chat API has "
                                              "no field for it"):
        list(client([server]).generate([REQ, stepped]))
    assert Scripted.seen == []
