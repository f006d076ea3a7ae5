"""Stages forked from the stage server (alignment/prefork.py) behave as the fresh `python -m alignment.runner` they
replace: same exit code and error, a process of their own, no teacher key, and they end with their orchestrator."""

import json
import os
import signal
import sys
import time

import pytest

from alignment import prefork
from alignment.config import load_recipe
from alignment.launcher import stage_env, stage_server

RUNNER = [sys.executable, "-m", "alignment.runner"]


def server() -> prefork.Server:
    assert prefork._server is not None and prefork._server.usable(), "no CUDA here: the server forks"
    return prefork._server


def test_a_forked_stage_fails_with_the_code_and_message_of_a_fresh_one(tmp_path, capfd):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"stage": "no_such_stage"}))
    fresh = prefork.run(RUNNER + [str(job)], dict(os.environ))
    fresh_err = capfd.readouterr().err
    with prefork.serving(dict(os.environ)):
        forked = prefork.run(RUNNER + [str(job)], dict(os.environ))
        children, server_pid = list(server().children), server().proc.pid
    forked_err = capfd.readouterr().err
    assert fresh == forked == 2
    assert "unknown stage 'no_such_stage'" in fresh_err and forked_err == fresh_err
    assert len(children) == 1 and children[0] not in (os.getpid(), server_pid)  # a process of its own


def test_the_teacher_key_stays_out_of_the_server_and_its_stages(tmp_path, monkeypatch):
    """The server starts without the key; a stage that holds it (generate) starts fresh, the others fork."""
    monkeypatch.setenv("TEACHER_KEY", "secret")
    recipe = load_recipe("recipes/tiny.yaml", [f"runs_dir={tmp_path}", "teacher.api_key_env=TEACHER_KEY"])
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"stage": "no_such_stage"}))
    with stage_server(recipe):
        assert "TEACHER_KEY" not in prefork._server.env
        assert open(f"/proc/{prefork._server.proc.pid}/environ", "rb").read().count(b"TEACHER_KEY") == 0
        assert prefork.run(RUNNER + [str(job)], stage_env(recipe, "generate")) == 2
        assert server().children == []  # the key-holding stage ran as a fresh process
        assert prefork.run(RUNNER + [str(job)], stage_env(recipe, "sft")) == 2
        assert len(server().children) == 1


def test_prefork_off_runs_every_stage_fresh(tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [f"runs_dir={tmp_path}", "launcher.prefork=false"])
    with stage_server(recipe):
        assert prefork._server is None


def test_a_stage_ends_when_its_orchestrator_is_interrupted(tmp_path):
    """Ctrl-C (or any error) in the orchestrator while a forked stage runs stops the stage, as subprocess.run
    does for a fresh one. The stage here blocks reading its job file, a FIFO nobody writes."""
    job = tmp_path / "job.json"
    os.mkfifo(job)

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with prefork.serving(dict(os.environ)):
            server().usable()  # (imports done, so the alarm below lands while the stage runs)
            signal.alarm(2)
            with pytest.raises(KeyboardInterrupt):
                prefork.run(RUNNER + [str(job)], dict(os.environ))
            child = server().children[-1]
    finally:
        signal.signal(signal.SIGALRM, old)
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}"), "the forked stage outlived its orchestrator"
