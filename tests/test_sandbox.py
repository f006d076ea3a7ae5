"""Model-written code runs isolated by the OS, and the harness outside its process decides each test: whatever the
code does, to the verdict or to the host, is a failed sample or has no effect outside its throwaway folder."""

import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from alignment import sandbox
from alignment.sandbox import Plan, extract_code, run_many, run_tests

# Skipped only where bubblewrap cannot be had: CI installs it with apt (make's install step), so there a missing
# bwrap is a failure, not a skip.
isolated = pytest.mark.skipif(sandbox.isolation_problem() is not None and shutil.which("apt-get") is None,
                              reason=f"no isolation on this machine without apt: {sandbox.isolation_problem()}")

ADD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
# The value a test asserts must come back: a sandbox whose check proves the attack failed passes this.
HOST_PID = os.getpid()


@isolated
def test_a_correct_solution_passes_and_a_wrong_one_fails():
    assert run_tests(ADD, TESTS) == sandbox.Outcome(True, "passed", 2, 2, decided_outside=2)
    # add(2, 3) = -1 and add(-1, 1) = -2: neither test passes; the first one is named
    assert run_tests(WRONG, TESTS) == sandbox.Outcome(False, "failed: assert add(2, 3) == 5", 0, 2, decided_outside=2)


@isolated
@pytest.mark.parametrize("hack", [
    WRONG + "import sys\nsys.exit(0)\n",
    WRONG + "import os\nos._exit(0)\n",
    WRONG + "import atexit, os\natexit.register(os._exit, 0)\n",
    WRONG + "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "def add(a, b):\n    raise SystemExit(0)\n",
    # an answer that equals anything
    "class Anything:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Anything()\n",
    # a str subclass equal to anything and printing as the answer: its JSON is its real text, ''
    "class S(str):\n    __eq__ = lambda s, o: True\n    __repr__ = lambda s: '5'\ndef add(a, b):\n    return S()\n",
    # reading the expected values from the tests (they used to sit in the same file)
    "import os, re\ndef add(a, b):\n    for name in os.listdir('.'):\n"
    "        m = re.search(rf'add\\({a}, {b}\\) == (-?\\d+)', open(name).read())\n"
    "        if m:\n            return int(m.group(1))\n",
    # forging result lines: the answer is not known, so a guess
    "open('results.jsonl', 'a').write('{\"i\": 0, \"json\": 1}\\n{\"i\": 1, \"ok\": true}\\n')\nimport os\nos._exit(0)\n",
])
def test_every_way_of_faking_a_pass_fails(hack):
    out = run_tests(hack, TESTS)
    assert not out.passed and out.tests_passed == 0 and out.tests_run == 2


@isolated
def test_a_fraction_of_the_tests_is_counted():
    # right for a + b when a == 0 or b == 0: 0 + 3 = 3 and 4 + 0 = 4 pass, 2 + 3 = 6 does not
    code = "def add(a, b):\n    return a + b if 0 in (a, b) else a * b\n"
    out = run_tests(code, "assert add(0, 3) == 3\nassert add(4, 0) == 4\nassert add(2, 3) == 5\n")
    assert (out.passed, out.tests_passed, out.tests_run) == (False, 2, 3)


@isolated
def test_truth_asserts_and_setup_statements_run_in_order():
    code = "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n"
    tests = "PRIMES = [2, 3, 5]\nassert is_prime(7)\nassert not is_prime(9)\nfor p in PRIMES:\n    assert is_prime(p)\n"
    # the loop runs in the parent: one check per prime, five in all
    assert run_tests(code, tests) == sandbox.Outcome(True, "passed", 5, 5, decided_outside=5)
    wrong = run_tests("def is_prime(n):\n    return n % 2 == 1\n", tests)  # 9 is odd and 2 even: 7, 3, 5 pass
    assert (wrong.passed, wrong.tests_passed, wrong.tests_run) == (False, 3, 5)


@isolated
def test_an_endless_loop_is_stopped_at_the_time_limit():
    start = time.time()
    out = run_tests("def add(a, b):\n    while True:\n        pass\n", TESTS, timeout_s=1.0)
    assert not out.passed and out.reason == "timeout"
    assert time.time() - start < 10


@isolated
def test_its_own_folder_is_writable_and_the_environment_empty(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "abc")
    code = ("import os\nopen('scratch.txt', 'w').write('ok')\nSCRATCH = open('scratch.txt').read()\n"
            "ENV = sorted(os.environ)\n") + ADD
    assert run_tests(code, "assert SCRATCH == 'ok'\nassert [k for k in ENV if 'SECRET' in k] == []\n").passed


@isolated
def test_no_host_process_is_visible():
    code = (f"import os\nPIDS = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            f"SEES_HOST = os.path.exists('/proc/{HOST_PID}')\nME = os.getpid()\n")
    # PID 1 is bwrap's init, 2 the harness; the test's own PID is not there
    assert run_tests(code, "assert PIDS == [1, 2]\nassert SEES_HOST == False\nassert ME == 2\n").passed


@isolated
def test_the_host_loopback_is_unreachable_even_with_the_old_audit_hook_switched_off():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    reached = []
    t = threading.Thread(target=lambda: reached.append(_accept(server)), daemon=True)
    t.start()
    code = ("import sys\nm = sys.modules['__main__']\nm.BLOCKED_EVENTS = ()\nm.WRITE_EVENTS = ()\n"
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n    REACHED = True\n"
            "except OSError:\n    REACHED = False\n")
    out = run_tests(code, "assert REACHED == False\n")
    t.join()
    server.close()
    assert out.passed and reached == [False]


def _accept(server) -> bool:
    try:
        server.accept()[0].close()
        return True
    except OSError:
        return False


@isolated
def test_files_outside_are_neither_readable_nor_writable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("expected values")
    target = tmp_path / "escaped.txt"
    in_prefix = Path(sys.base_prefix, f"sandbox-test-{uuid.uuid4().hex}.txt")  # visible inside, read-only
    in_prefix.write_text("keep")
    try:
        code = f"""import os, sqlite3
def attempt(f):
    try:
        f()
        return 'done'
    except Exception as e:
        return type(e).__name__
READ = attempt(lambda: open({str(secret)!r}).read())
ROOT = sorted(os.listdir('/root'))
WRITE = attempt(lambda: open({str(target)!r}, 'w').write('x'))
DIR_FD = attempt(lambda: os.open({str(target.relative_to('/'))!r}, os.O_WRONLY | os.O_CREAT, dir_fd=os.open('/', os.O_RDONLY)))
TRUNC = attempt(lambda: os.open({str(in_prefix)!r}, os.O_RDONLY | os.O_TRUNC))
CHOWN = attempt(lambda: os.chown({str(in_prefix)!r}, 65534, 65534))
FIFO = attempt(lambda: os.mkfifo({str(tmp_path / "fifo")!r}))
SQL = attempt(lambda: sqlite3.connect({str(tmp_path / "x.db")!r}).execute('create table t (x)'))
"""
        tests = ("assert READ == 'FileNotFoundError'\nassert ROOT == ['.pyenv'] or ROOT == []\n"
                 "assert WRITE == 'FileNotFoundError'\nassert DIR_FD == 'FileNotFoundError'\n"
                 "assert TRUNC == 'OSError'\nassert CHOWN == 'OSError'\nassert FIFO == 'FileNotFoundError'\n"
                 "assert SQL == 'OperationalError'\n")
        out = run_tests(code, tests)
        assert out.passed, out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
        assert in_prefix.read_text() == "keep" and in_prefix.stat().st_uid == os.getuid()
    finally:
        in_prefix.unlink()


@isolated
def test_processes_it_starts_stay_inside(tmp_path):
    target = tmp_path / "from-child.txt"
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = f"""import os, signal, subprocess, _posixsubprocess
r, w = os.pipe()
pid = _posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'echo ran > proof; echo x > {target}'], [b'/bin/sh'],
    True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None, False)
os.waitpid(pid, 0)
PROOF = open('proof').read()
try:
    signal.pidfd_send_signal(os.pidfd_open({victim.pid}), signal.SIGKILL)
    KILL = 'done'
except OSError as e:
    KILL = type(e).__name__
"""
        out = run_tests(code, "assert PROOF == 'ran\\n'\nassert KILL == 'ProcessLookupError'\n")
        assert out.passed, out
        assert not target.exists() and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@isolated
@pytest.mark.skipif("not capped" in sandbox.isolation(), reason="no pids cgroup here: processes are not capped")
def test_a_fork_bomb_is_capped():
    code = """import os, time
FORKED = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        FORKED += 1
    except OSError:
        break
"""
    out = run_tests(code, f"assert FORKED < {sandbox.PIDS_MAX}\nassert FORKED > 0\n", timeout_s=10)
    assert out.passed, out


@isolated
def test_nothing_it_started_outlives_the_time_limit():
    marker = f"sandbox-survivor-{uuid.uuid4().hex}"
    code = f"""import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])
    os._exit(0)
while True:
    pass
"""
    seen = []
    watcher = threading.Thread(target=lambda: seen.append(_wait_for(marker, 5)), daemon=True)
    watcher.start()
    out = run_tests(code, TESTS, timeout_s=3)
    watcher.join()
    assert out.reason == "timeout" and seen == [True]  # the survivor did start, seen from the host
    time.sleep(0.5)
    assert not _wait_for(marker, 0)


def _wait_for(marker: str, seconds: float) -> bool:
    """Whether a host process whose command line holds `marker` is alive within `seconds`."""
    end = time.time() + seconds
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        if time.time() >= end:
            return False
        time.sleep(0.05)


@isolated
def test_endless_output_ends_as_a_failure_and_the_parent_reads_only_a_tail():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = "import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n    sys.stdout.write('y' * 65536)\n"
    out = run_tests(code + ADD, TESTS, timeout_s=3)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert not out.passed and "File too large" in out.reason and len(out.reason) <= 210
    assert grown_kb < 32 * 1024  # the 16 MB the file may reach is never read whole


@isolated
def test_exhausting_memory_fails():
    out = run_tests("x = bytearray(4 * 1024 ** 3)\n" + ADD, TESTS, memory_mb=256)
    assert not out.passed and "MemoryError" in out.reason


@pytest.mark.parametrize("response,code", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```\nthen\n```python\nx = 2\n```", "x = 2\n"),  # the last block is the answer
    ("def f(): return 1", "def f(): return 1"),                      # no fence: the whole response
])
def test_code_is_taken_from_the_last_fenced_block(response, code):
    assert extract_code(response) == code


@isolated
def test_many_runs_keep_their_order():
    jobs = [(ADD, TESTS), ("def add(a, b):\n    return 0\n", TESTS), (ADD, TESTS)]
    assert [o.passed for o in run_many(jobs, timeout_s=5, memory_mb=512, workers=2)] == [True, False, True]


def test_without_bwrap_a_code_verifier_refuses_unless_the_recipe_gives_isolation_up(monkeypatch):
    from alignment.config import InputError, VerifierConfig
    from alignment.verifiers import check_isolation, isolation_stats

    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "bubblewrap is not installed: `apt-get install bubblewrap`")
    with pytest.raises(InputError, match=r"reward.verifiers\[code\]: bubblewrap is not installed: `apt-get install"):
        check_isolation([VerifierConfig(name="code", kind="code")])
    check_isolation([VerifierConfig(name="math"), VerifierConfig(name="code", kind="code", unsafe_no_isolation=True)])
    stats = isolation_stats([VerifierConfig(name="math"), VerifierConfig(name="code", kind="code", unsafe_no_isolation=True)])
    assert list(stats) == ["code"] and stats["code"].startswith("NONE (unsafe_no_isolation)")


def test_without_isolation_the_verdict_still_stays_outside():
    assert run_tests(ADD, TESTS, isolated=False) == sandbox.Outcome(True, "passed", 2, 2, decided_outside=2)
    assert not run_tests(WRONG + "import os\nos._exit(0)\n", TESTS, isolated=False).passed


def test_a_docstring_in_the_tests_is_not_a_check():
    assert Plan('"""Tests for add."""\nassert add(1, 1) == 2\n').counts() == (1, 0)
