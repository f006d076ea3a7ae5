"""Stage processes forked from one that has already imported the libraries every stage imports.

Each stage runs in its own process (alignment/runner.py), so whatever it held is released when it ends. On a CPU
machine a tiny-recipe stage spends a second or two on its work and 6-10 s importing torch, transformers, trl and
peft (transformers alone pulls in sklearn and scipy); a round pays that once per stage, and a test suite that runs
rounds pays it hundreds of times. So `align round` (and `align stage`) start one server per run that imports all of
that once, before any stage, and forks a child per stage. The child is the process `python -m alignment.runner
job.json` would have been: its own memory, released when it exits, its own exit code; it starts in milliseconds.

A stage starts fresh instead (`subprocess`, as before) where a fork would not be that same process:
- with a CUDA device visible: a process forked after CUDA's driver is initialised cannot use CUDA, and imports may
  initialise it; on a GPU machine a stage's start-up is seconds against its minutes of work anyway;
- when the stage's environment differs from the server's: the server starts without the teacher's API key, and a
  forked child's /proc/<pid>/environ shows the server's environment, so the stages that hold the key start fresh;
- distributed trainers (`accelerate launch` starts its own processes) and SLURM jobs (they run on other nodes).

`launcher.prefork: false` turns it off.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager, suppress

_server: "Server | None" = None  # the one `serving` started, for `run` to use


class Server:
    def __init__(self, env: dict):
        self.env = env
        requests_r, self.requests = os.pipe()
        self.replies, replies_w = os.pipe()
        # fds 3 and 4 in the server: its stdout and stderr stay the orchestrator's, which the stages write to
        self.proc = subprocess.Popen([sys.executable, "-m", "alignment.prefork", str(requests_r), str(replies_w)],
                                     env=env, pass_fds=(requests_r, replies_w))
        os.close(requests_r), os.close(replies_w)
        self.out, self.inp = os.fdopen(self.requests, "w"), os.fdopen(self.replies)
        self.ready: bool | None = None  # known once the server has imported everything and said whether it forks
        self.children: list[int] = []  # the stage processes it forked, in order

    def usable(self) -> bool:
        if self.ready is None:
            line = self.inp.readline()
            self.ready = bool(line) and json.loads(line)["forks"]
        return self.ready

    def run(self, job: str) -> int:
        self.out.write(json.dumps({"job": job, "cwd": os.getcwd()}) + "\n")
        self.out.flush()
        pid = self.reply()["pid"]
        self.children.append(pid)
        try:
            return self.reply()["code"]
        except BaseException:  # Ctrl-C, or an error here: the stage ends with its orchestrator, as subprocess.run's
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            raise

    def reply(self) -> dict:
        if not (line := self.inp.readline()):
            raise RuntimeError("the stage server (alignment/prefork.py) ended before its stage did; its error is "
                               "above")
        return json.loads(line)

    def close(self) -> None:
        with suppress(OSError):
            self.out.close()  # the server ends when its requests do
        if not self.children:  # every stage was up to date (or ran fresh): no need to wait for its imports to end
            self.proc.kill()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with suppress(OSError):
            self.inp.close()


@contextmanager
def serving(env: dict, enabled: bool = True):
    """While inside, `run` forks stages whose environment is `env` from one server started now."""
    global _server
    if not enabled or _server is not None:  # (already serving: a nested call keeps the outer server)
        yield
        return
    _server = Server(env)
    try:
        yield
    finally:
        server, _server = _server, None
        server.close()


def run(command: list[str], env: dict) -> int:
    """The exit code of `command` (`python -m alignment.runner job.json` is forked from the server when one is
    serving this environment and could start; anything else runs as a fresh process)."""
    plain = command[:3] == [sys.executable, "-m", "alignment.runner"] and len(command) == 4
    if plain and _server is not None and env == _server.env and _server.usable():
        return _server.run(command[3])
    return subprocess.run(command, env=env).returncode


# --- the server process ------------------------------------------------------------------------------------


def preload() -> bool:
    """Import what the stages import; True when forking is safe (no CUDA device)."""
    from alignment.stage_table import STAGES

    for name in STAGES:
        importlib.import_module(f"alignment.stages.{name}")
    importlib.import_module("alignment.runner")
    import torch

    return not torch.cuda.is_available()


def serve(requests_fd: int, replies_fd: int) -> int:
    """Answer each request (a job and the working directory) with the exit code of a child that ran it. Returns
    when the requests end (in the server) or when the child's stage has run (in the child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stage and the orchestrator; they decide
    requests, replies = os.fdopen(requests_fd), os.fdopen(replies_fd, "w")
    forks = preload()
    replies.write(json.dumps({"forks": forks}) + "\n")
    replies.flush()
    for line in requests if forks else ():
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close(), replies.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            return run_child(req)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()
    return 0


def run_child(req: dict) -> int:
    """What `python -m alignment.runner job.json` does, in the forked child. Returns the exit code; the caller exits
    the normal way (atexit handlers, threads joined, streams flushed), as that process would have."""
    from alignment import runner

    os.chdir(req["cwd"])
    sys.argv = [runner.__file__, req["job"]]
    try:
        runner.main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2])))
