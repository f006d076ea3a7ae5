"""Run model-written Python against unit tests in a separate, limited process.

Each run gets a throwaway working directory, a fresh interpreter in isolated mode (`-I`: no site-packages path
from the environment, no user site, no PYTHON* variables), an empty environment, and limits on CPU time, address
space, file size and wall time; the whole process group is killed when the wall time is up. Inside, an audit hook
(which Python code cannot remove) refuses sockets, subprocesses, `ctypes`, and opening files for writing outside
the working directory. A refused action raises, so the tests fail and the sample scores as a failure.

This stops the mistakes and accidents of generated code (an infinite loop, a stray `open("/etc/...", "w")`, a
download). It is not a boundary against code written to escape; run untrusted workloads in a container too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Runs first in the child: installs the guard, then executes the program file in a clean namespace.
GUARD = r'''
import os, resource, sys
cpu_s, memory = int(sys.argv[1]), int(sys.argv[2]) * 1024 * 1024
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory),
                     (resource.RLIMIT_FSIZE, 16 * 1024 * 1024), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
ROOT = os.path.realpath(os.getcwd())
BLOCKED_EVENTS = ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "subprocess.Popen",
                  "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
                  "ctypes.dlopen", "ctypes.cdata", "os.chdir", "shutil.rmtree", "os.kill", "os.killpg")
WRITE_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                "os.truncate", "os.utime")
def inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor
    p = os.path.realpath(os.path.join(ROOT, os.fsdecode(path)))
    return p == ROOT or p.startswith(ROOT + os.sep)
def guard(event, args):
    if event in BLOCKED_EVENTS or (event == "import" and args[0] in ("ctypes", "_ctypes")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args[0] is not None:
        mode = args[1] if isinstance(args[1], str) else ""
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
    if event in WRITE_EVENTS and args and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")
sys.addaudithook(guard)
del guard
source = open("program.py").read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
'''

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced code block of a response (models explain before and after it); the whole response when
    there is no fence."""
    blocks = FENCE.findall(response)
    return blocks[-1] if blocks else response


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", "failed", "timeout", or "error: <last line of stderr>"


def run_tests(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512) -> Outcome:
    """Run `code` followed by `tests` (plain asserts, or anything that raises on failure); passed means exit 0."""
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        Path(tmp, "program.py").write_text(code + "\n\n" + tests + "\n")
        Path(tmp, "guard.py").write_text(GUARD)
        try:
            cpu_s = max(1, int(timeout_s) + 1)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "guard.py", str(cpu_s), str(memory_mb)],
                cwd=tmp, env={"PATH": "/usr/bin:/bin", "HOME": tmp},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True)  # limits are set by the child itself: preexec_fn is unsafe with threads
        except OSError as e:
            return Outcome(False, f"error: could not start the sandbox: {e}")
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout")
    if proc.returncode == 0:
        return Outcome(True, "passed")
    if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU):
        return Outcome(False, "timeout")
    lines = err.decode(errors="replace").strip().splitlines()
    last = lines[-1] if lines else f"exit code {proc.returncode}"
    return Outcome(False, "failed" if last.startswith("AssertionError") else f"error: {last[:200]}")


def run_many(jobs: list[tuple[str, str]], timeout_s: float, memory_mb: int, workers: int | None = None) -> list[Outcome]:
    """`run_tests` over (code, tests) pairs, several processes at once; outcomes in input order."""
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda j: run_tests(j[0], j[1], timeout_s, memory_mb), jobs))
