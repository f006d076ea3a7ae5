"""Run model-written Python against unit tests in a process the operating system isolates, and decide each
test's outcome outside it.

Isolation. The code runs under bubblewrap (`bwrap`) with every namespace unshared: its own PID namespace (it is
PID 2 and sees no host process), no network (the host's 127.0.0.1 is another interface), an empty environment,
and a filesystem of read-only /usr, /lib and the interpreter's own prefix (not the venv's site-packages, not the
rest of /root), a private /tmp, and one writable folder: its throwaway run folder. Inside, the harness sets limits
on CPU time, address space, file size and core dumps. The number of processes is capped by a fresh `pids` cgroup
(PIDS_MAX) where one can be made (root, a pids controller: cgroup v1 at /sys/fs/cgroup/pids or v2 with pids
enabled); elsewhere it is not capped (RLIMIT_NPROC does not hold for a uid mapped to root), so a fork bomb runs
until the wall time is up, each process still under the memory limit. At the wall time the whole namespace is
killed (bwrap's process group, the namespace's init dies with it, then whatever the cgroup still holds).
Where bwrap is missing or cannot create namespaces, `isolation_problem` says so and a code verifier refuses to
run unless its recipe sets `unsafe_no_isolation` (then only the limits and the verdict below remain).

Verdict. The tests never enter the sandbox. The parent parses them (`plan`): each top-level
`assert <expr> <op> <literal>` sends only `<expr>` in; the harness returns its value as JSON (or marks it
unserializable) and the parent compares it with the literal, so an object whose `__eq__` always says True, an
early `sys.exit(0)`/`os._exit(0)`, or code that reads the test file gains nothing: a test whose value never came
back failed. Exit status means nothing; stdout and stderr go to files capped by the file-size limit and only
their tail is read back.

What remains forgeable: any check whose truth the candidate's process computes. That is an assert without a
literal comparison (`assert is_prime(7)`, `assert f(x) == expected_var`) or with a literal that JSON cannot hold
(sets, bytes), and a top-level statement that asserts inside (a `for` loop of asserts, HumanEval's `check(f)`,
passed when it raises nothing): the harness reports them from a process the candidate controls (it can replace
the harness's `report`, or make `__bool__` say True). Such expressions (and any setup statement) are sent into
the sandbox whole, so values written in them are readable by the candidate. A literal test is forgeable only by
producing the expected value, which is what a unit test asks for.
"""

from __future__ import annotations

import ast
import functools
import json
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

FILE_LIMIT = 16 * 1024 * 1024  # bytes any file (results, stdout, stderr) may reach; also what the parent reads
PIDS_MAX = 32                  # processes per run, the sandbox's own three (bwrap, its init, python) included
PYTHON = str(Path(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}"))

# Runs in the sandbox: limits, the candidate's program, then each step of the tests, one result line per check.
HARNESS = r'''
import json, os, resource, sys, traceback
cpu_s, memory, file_limit = map(int, sys.argv[1:4])
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory * 1024 * 1024),
                     (resource.RLIMIT_FSIZE, file_limit), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
steps = json.load(open("steps.json"))
out = open("results.jsonl", "w", buffering=1)
def report(i, **record):
    out.write(json.dumps({"i": i, **record}) + "\n")
ns = {"__name__": "__main__"}
def stop():  # the reason goes to the results too: stderr may be full
    report(-1, error=traceback.format_exc().strip().splitlines()[-1][:200])
    os._exit(1)
try:
    exec(compile(open("program.py").read(), "program.py", "exec"), ns)
except BaseException:  # SystemExit included: leaving early is no pass
    stop()
for i, (kind, source) in enumerate(steps):
    try:
        if kind in ("setup", "check"):
            exec(source, ns)
            if kind == "check":
                report(i, ok=True)
        elif kind == "truth":
            report(i, ok=bool(eval(source, ns)))
        else:
            value = eval(source, ns)
            try:
                report(i, json=value)
            except Exception:  # not plain data: never equal to a literal
                report(i, unserializable=repr(type(value))[:100])
    except BaseException as e:
        if kind == "setup":
            stop()
        report(i, error=f"{type(e).__name__}: {e}"[:200])
out.close()
os._exit(0)  # skips the candidate's atexit handlers and waiting for its threads
'''

OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
       ast.Gt: operator.gt, ast.GtE: operator.ge}
FLIP = {ast.Eq: ast.Eq, ast.NotEq: ast.NotEq, ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE}
# Top-level statements that test something by not raising (a loop of asserts, `check(f)`); the rest is setup.
CHECK_STATEMENTS = (ast.Expr, ast.For, ast.While, ast.If, ast.With, ast.Try)

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
    tests_passed: int = 0
    tests_run: int = 0


def _literal(node: ast.AST):
    """(True, the literal as JSON gives it back) for plain data; (False, None) otherwise."""
    try:
        return True, json.loads(json.dumps(ast.literal_eval(node)))
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False, None


def plan(tests: str) -> tuple[list[tuple[str, str]], dict[int, tuple]]:
    """The steps sent into the sandbox, [(kind, source)], and for each "value" step the (operator, literal) the
    parent compares its value with. Kinds: setup (runs; raising ends the run), value, truth, check."""
    steps, expected = [], {}
    for stmt in ast.parse(tests).body:
        t = stmt.test if isinstance(stmt, ast.Assert) else None
        if isinstance(t, ast.Compare) and len(t.ops) == 1 and type(t.ops[0]) in OPS:
            for expr, lit, op in ((t.left, t.comparators[0], type(t.ops[0])),
                                  (t.comparators[0], t.left, FLIP[type(t.ops[0])])):
                ok, value = _literal(lit)
                if ok:
                    expected[len(steps)] = (OPS[op], value)
                    steps.append(("value", ast.unparse(expr)))
                    break
            else:
                steps.append(("truth", ast.unparse(t)))
        elif t is not None:
            steps.append(("truth", ast.unparse(t)))
        else:
            docstring = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            check = isinstance(stmt, CHECK_STATEMENTS) and not docstring
            steps.append(("check" if check else "setup", ast.unparse(stmt)))
    return steps, expected


def bwrap_args(folder: str) -> list[str]:
    binds = ["--ro-bind", "/usr", "/usr", "--ro-bind", sys.base_prefix, sys.base_prefix]
    for path in ("/lib", "/lib64", "/bin"):  # absent or symlinks into /usr on some systems
        binds += ["--ro-bind-try", path, path]
    return ["bwrap", "--unshare-all", "--die-with-parent", "--clearenv", *binds, "--proc", "/proc",
            "--dev", "/dev", "--tmpfs", "/tmp", "--bind", folder, "/work", "--chdir", "/work",
            "--uid", "65534", "--gid", "65534"]


@functools.cache
def isolation_problem() -> str | None:
    """Why code cannot be isolated on this machine (None: it can), with the fix."""
    if shutil.which("bwrap") is None:
        return ("bubblewrap is not installed: `apt-get install bubblewrap` (or set the verifier's "
                "unsafe_no_isolation: true to run model-written code without isolation)")
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
        probe = subprocess.run(bwrap_args(tmp) + [PYTHON, "-I", "-S", "-c", "pass"], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=30)
    if probe.returncode != 0:
        return (f"bubblewrap cannot isolate a process here ({probe.stderr.decode(errors='replace').strip()[:200]}); "
                "user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1 / "
                "user.max_user_namespaces) or the container forbids them; or set unsafe_no_isolation: true")
    return None


def isolation(isolated: bool = True) -> str:
    """In words, for manifests: how a run is isolated on this machine."""
    group = _pids_cgroup()
    if group is not None:
        _remove_cgroup(group)
    procs = f"processes capped at {PIDS_MAX}" if group else "processes not capped (no pids cgroup)"
    return f"{'bubblewrap' if isolated else 'NONE (unsafe_no_isolation)'}; {procs}"


def _pids_cgroup() -> Path | None:
    """A fresh pids cgroup capped at PIDS_MAX, or None where none can be made."""
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        group = root / f"sandbox-{uuid.uuid4().hex}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            with open(group / "pids.max", "r+") as f:  # r+: a plain directory (no controller) has no such file
                f.write(str(PIDS_MAX))
            return group
        except OSError:
            shutil.rmtree(group, ignore_errors=True)
    return None


def _remove_cgroup(group: Path) -> None:
    """Kill whatever the group still holds, then remove it (removal fails until the last process is gone)."""
    for _ in range(200):
        with suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.01)


def _tail(path: Path, n: int = 2000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - n))
        return f.read(n).decode(errors="replace")


def _results(path: Path) -> dict[int, dict]:
    records = {}
    with open(path, "rb") as f:
        for line in f.read(FILE_LIMIT).splitlines():
            with suppress(ValueError, RecursionError):  # whatever the candidate wrote there
                r = json.loads(line)
                if isinstance(r, dict) and isinstance(r.get("i"), int):
                    records[r["i"]] = r
    return records


def run_tests(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512,
              isolated: bool = True) -> Outcome:
    """Run `code`, then `tests` step by step (see `plan`); passed means every check passed."""
    steps, expected = plan(tests)
    checks = [i for i, (kind, _) in enumerate(steps) if kind != "setup"]
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        folder = Path(tmp)
        (folder / "program.py").write_text(code)
        (folder / "harness.py").write_text(HARNESS)
        (folder / "steps.json").write_text(json.dumps(steps))
        argv = [PYTHON, "-I", "-S", "-B", "harness.py", str(max(1, int(timeout_s) + 1)), str(memory_mb),
                str(FILE_LIMIT)]
        if isolated:
            argv = bwrap_args(tmp) + argv
        group = _pids_cgroup()
        if group is not None:  # the shell joins the group, then becomes bwrap: every descendant is counted
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *argv]
        try:
            with open(folder / "output.log", "wb") as log:
                proc = subprocess.Popen(argv, cwd=tmp, env={"PATH": "/usr/bin:/bin", "HOME": "/work"},
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent takes the namespace down with it
                proc.wait()
        except OSError as e:
            return Outcome(False, f"error: could not start the sandbox: {e}", 0, len(checks))
        finally:
            if group is not None:
                _remove_cgroup(group)
        results, last = _results(folder / "results.jsonl"), (_tail(folder / "output.log").strip().splitlines()
                                                              or [""])[-1]
    passed = 0
    for i in checks:
        r = results.get(i, {})
        if i in expected:
            op, want = expected[i]
            with suppress(TypeError):
                passed += "json" in r and bool(op(r["json"], want))
        else:
            passed += r.get("ok") is True
    if checks and passed == len(checks):
        return Outcome(True, "passed", passed, len(checks))
    if timed_out or proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU, 128 + signal.SIGKILL,
                                        128 + signal.SIGXCPU):
        reason = "timeout"
    elif "error" in results.get(-1, {}) or (len(results) < len(checks) and last):
        reason = f"error: {str(results.get(-1, {}).get('error', last))[:200]}"
    else:
        reason = "failed" if checks else "failed: the tests contain no check"
    return Outcome(False, reason, passed, len(checks))


def run_many(jobs: list[tuple[str, str]], timeout_s: float, memory_mb: int, workers: int | None = None,
             isolated: bool = True) -> list[Outcome]:
    """`run_tests` over (code, tests) pairs, several processes at once; outcomes in input order."""
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda j: run_tests(j[0], j[1], timeout_s, memory_mb, isolated), jobs))
