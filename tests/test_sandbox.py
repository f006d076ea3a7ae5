"""Model-written code runs in a separate, limited process; whatever it does wrong is a failed sample, never a
hung stage or a change outside its throwaway directory."""

import os
import socket
import threading
import time

import pytest

from alignment.sandbox import extract_code, run_many, run_tests

ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    assert run_tests(ADD, TESTS).passed
    wrong = run_tests("def add(a, b):\n    return a - b\n", TESTS)
    assert not wrong.passed and wrong.reason == "failed"


def test_an_endless_loop_is_stopped_at_the_time_limit():
    start = time.time()
    out = run_tests("def add(a, b):\n    while True:\n        pass\n", TESTS, timeout_s=1.0)
    assert not out.passed and out.reason == "timeout"
    assert time.time() - start < 10


def test_writing_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    out = run_tests(f"open({str(target)!r}, 'w').write('x')\n" + ADD, TESTS)
    assert not out.passed and "outside the working directory" in out.reason
    assert not target.exists()
    # deleting something outside is refused too
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    assert not run_tests(f"import os\nos.remove({str(keep)!r})\n" + ADD, TESTS).passed
    assert keep.exists()


def test_its_own_directory_is_writable():
    code = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n" + ADD
    assert run_tests(code, TESTS).passed


def test_opening_a_socket_is_refused():
    # a real listener on loopback: the sandboxed code must not reach it
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    reached = []
    t = threading.Thread(target=lambda: reached.append(_accept(server)), daemon=True)
    t.start()
    out = run_tests(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n" + ADD, TESTS)
    t.join()
    server.close()
    assert not out.passed and "socket" in out.reason
    assert reached == [False]


def _accept(server) -> bool:
    try:
        server.accept()[0].close()
        return True
    except OSError:
        return False


def test_starting_a_process_and_exhausting_memory_fail():
    assert not run_tests("import subprocess\nsubprocess.run(['true'])\n" + ADD, TESTS).passed
    out = run_tests("x = bytearray(4 * 1024 ** 3)\n" + ADD, TESTS, memory_mb=256)
    assert not out.passed and "MemoryError" in out.reason


def test_the_environment_is_not_passed_on(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "abc")
    assert run_tests("import os\nassert 'SECRET_TOKEN' not in os.environ\n" + ADD, TESTS).passed
    assert os.environ["SECRET_TOKEN"] == "abc"


@pytest.mark.parametrize("response,code", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```\nthen\n```python\nx = 2\n```", "x = 2\n"),  # the last block is the answer
    ("def f(): return 1", "def f(): return 1"),                      # no fence: the whole response
])
def test_code_is_taken_from_the_last_fenced_block(response, code):
    assert extract_code(response) == code


def test_many_runs_keep_their_order():
    jobs = [(ADD, TESTS), ("def add(a, b):\n    return 0\n", TESTS), (ADD, TESTS)]
    assert [o.passed for o in run_many(jobs, timeout_s=5, memory_mb=512, workers=2)] == [True, False, True]
