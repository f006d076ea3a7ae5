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

Verdict: what is decided outside the candidate's process. Each point is held by a test (tests/test_code_verifier.py,
CLAIMS):
- The tests never enter the candidate's process: the parent interprets them (`Plan`, `Run`) with a restricted
  evaluator that knows literals, the names the tests bind, operators, comprehensions, lambdas, `if` and `for`, the
  builtins in PURE_BUILTINS, the modules in PURE_MODULES and the methods of plain values, and that calls the
  candidate's code only by asking its process.
- Any other name, save the tests' own definitions (below), is the candidate's: a call of it (`f(x)`, HumanEval's
  `candidate(x)`) goes to the candidate's process with its arguments as plain data, and the value comes back as
  plain data: None, bool, int, float, str and list as JSON; tuple, set, frozenset, dict, bytes and non-finite
  floats as tagged objects; any other object is refused and its check fails, so the candidate's `__eq__`,
  `__bool__` or `__sub__` is never called.
- A reply is parsed strictly: a bare NaN or Infinity, a number that overflows a float, or a JSON object that is not
  one of the tags is no value.
- HumanEval's `def check(candidate)` runs in the parent with `candidate` bound to the function named at
  `check(entry_point)`; a `for` loop of asserts runs in the parent, one check each time an assert runs; and
  `set(f(x)) == set((4, 5))`, `f('a') == 'a' * 3`, `math.isclose(f(x), 0.3)` and `abs(f(x) - 0.3) < 1e-6` are
  computed in the parent on the returned values, the tolerance with them.
- A comparison with a NaN on either side, and a `!=`, `<`, `<=`, `>` or `>=` with an infinity on either side,
  decides nothing: its check fails, under a `not` too (`math.isnan(f(x))`, `f(x) == float('inf')` still hold).
- So an object whose `__eq__` always says True, a `sys.exit(0)`, or a replaced reporter gains nothing: a check
  whose value did not come back as plain data failed, and an exit status means nothing.
- The program's stdout and stderr go to a file capped by the file-size limit, and only its tail is read back.
- The tests' own definitions that the parent does not interpret (functions, classes, other imports: MBPP's
  `test_setup_code`, HumanEval's prompt helpers such as `poly`, given as `tests_setup`) run in a second sandboxed
  process that holds no candidate code, started only when the tests call one of them; the name a check is given
  (`check(entry_point)`) is the candidate's even where those definitions hold a stub of it.

What is decided inside:
- A top-level statement of the tests that the parent cannot interpret (a `while`, `try` or `with`, a `check`
  function holding a `def` or an assignment to an attribute) and that asserts, or uses a name the parent's
  statements bind, can only be decided inside: it runs whole in the candidate's process and passes when that
  process replies that it raised nothing, which the candidate can forge.
- Such checks are counted (`Outcome.decided_inside`, `count_checks`) and run only with `allow_inside=True` (a code
  verifier's `allow_inside_checks`); otherwise they fail.
- What a candidate can always do is return the expected value for the arguments it is given: they are its to
  read, which is what a unit test asks.
"""

from __future__ import annotations

import ast
import builtins
import collections
import copy
import functools
import itertools
import json
import marshal
import math
import operator
import os
import random
import re
import selectors
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections import ChainMap
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

OUTPUT_TAIL = 4000  # characters of the candidate's output an Outcome keeps
FILE_LIMIT = 16 * 1024 * 1024  # bytes any file (stdout, stderr) or reply may reach; also what the parent reads
PIDS_MAX = 32                  # processes per run, the sandbox's own three (bwrap, its init, python) included
PYTHON = str(Path(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}"))

# Runs in the sandbox: limits, the program, then one reply line per request. The channel is the process's original
# stdin (requests: length-prefixed marshal, from the parent) and stdout (replies: JSON lines); the program's own
# stdout and stderr go to output.log. Whatever the program does to this code (it runs in the same interpreter) it
# can only change the replies, which are values, never verdicts. It imports no `json` (that pulls in `re` and
# `enum`, a third of a run's start-up): the reply writer below uses the C string encoder `json` itself uses.
HARNESS = r'''
import marshal, math, os, resource, sys, types
from _json import encode_basestring_ascii as jstr
cpu_s, memory, file_limit = map(int, sys.argv[1:4])
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory * 1024 * 1024),
                     (resource.RLIMIT_FSIZE, file_limit), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
rx, tx = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "w")
log = os.open("output.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(log, 1)
os.dup2(log, 2)
CALLABLE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)
ns = {"__name__": "__main__"}

class Refused(Exception):
    pass

def encode(v):  # JSON text; exact types only: a subclass could answer == or bool() its own way
    t = type(v)
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return int.__repr__(v)
    if t is str:
        return jstr(v)
    if t is float:
        return float.__repr__(v) if math.isfinite(v) else '{"t":"float","v":"%r"}' % v
    if t is list:
        return "[" + ",".join([encode(x) for x in v]) + "]"
    if t in (tuple, set, frozenset):
        return '{"t":"%s","v":[%s]}' % (t.__name__, ",".join([encode(x) for x in v]))
    if t is dict:
        return '{"t":"dict","v":[%s]}' % ",".join(["[%s,%s]" % (encode(k), encode(x)) for k, x in v.items()])
    if t is bytes:
        return '{"t":"bytes","v":"%s"}' % v.hex()
    if t in CALLABLE:
        return '{"t":"callable","v":null}'
    raise Refused(t.__name__)

def arg(item):  # (0, value) | (1, a name in the program) | (2, a module)
    kind, x = item
    return x if kind == 0 else eval(x, ns) if kind == 1 else __import__(x)

def send(text):
    tx.write(text + "\n")
    tx.flush()

def last_line():
    import traceback
    return (traceback.format_exc().strip().splitlines() or [""])[-1][:200]

try:
    exec(compile(open("program.py").read(), "program.py", "exec"), ns)
except BaseException:  # SystemExit included: leaving early is no pass
    send('{"error":%s}' % jstr(last_line()))
    os._exit(1)
send('{"ready":true}')
while len(size := rx.read(8)) == 8:
    op, src, args, kw = marshal.loads(rx.read(int.from_bytes(size, "little")))
    try:
        local = {k: arg(v) for k, v in kw.items()} if op != "call" else {}
        if op == "exec":
            exec(src, ns, local)
            send('{"ok":true}')
            continue
        if op == "call":
            value = eval(src, ns)(*[arg(a) for a in args], **{k: arg(v) for k, v in kw.items()})
        else:
            value = eval(src, ns, local)
        try:
            send('{"v":%s}' % encode(value))
        except (Refused, RecursionError, ValueError) as e:  # ValueError: an int too long to write
            send('{"refused":%s}' % jstr(f"{type(e).__name__}: {e}"[:100]))
    except BaseException:
        send('{"error":%s}' % jstr(last_line()))
os._exit(0)  # skips the candidate's atexit handlers and waiting for its threads
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
    reason: str  # "passed", "failed: <first failing check>", "timeout", or "error: <why the program stopped>"
    tests_passed: int = 0
    tests_run: int = 0
    decided_outside: int = 0  # checks run whose truth the parent computed
    decided_inside: int = 0   # checks run (or refused) that only the candidate's process could decide
    output: str = ""  # the tail of the candidate program's stdout and stderr (what execution feedback shows)


# --- values across the boundary ----------------------------------------------------------------------------------


class BadReply(Exception):
    """What came back is not a value (or the process is gone): the check that needed it fails."""


CALLABLE = object()  # the reply for a function: callable again only through its process
TAGS = {"tuple": tuple, "set": set, "frozenset": frozenset}
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class _Untagged(list):
    """A JSON object that is not one of the encoder's tags, while parsing: allowed only as the reply itself."""


def _pairs(pairs):
    if [k for k, _ in pairs] != ["t", "v"]:
        return _Untagged(pairs)
    t, v = pairs[0][1], pairs[1][1]
    if t in TAGS and isinstance(v, list):
        return TAGS[t](v)
    if t == "dict" and isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
        return dict(v)
    if t == "bytes" and isinstance(v, str):
        return bytes.fromhex(v)
    if t == "float" and v in NONFINITE:
        return NONFINITE[v]
    if t == "callable":
        return CALLABLE
    raise ValueError(f"unknown tag {t!r}")


def _no_constant(name):
    raise ValueError(f"bare {name} is not a value")


def _finite(text):
    if not math.isfinite(value := float(text)):
        raise ValueError(f"{text} overflows a float")
    return value


def _plain(v):
    if isinstance(v, _Untagged):
        raise ValueError("a JSON object where a value should be")
    if type(v) in (list, tuple, set, frozenset):
        for x in v:
            _plain(x)
    elif type(v) is dict:
        for k, x in v.items():
            _plain(k), _plain(x)
    return v


def decode(line: bytes) -> dict:
    """One reply line parsed strictly: {"v": value}, {"error": str}, {"refused": str}, {"ok"/"ready": True}."""
    try:
        reply = json.loads(line, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_pairs)
        if not isinstance(reply, _Untagged):
            raise ValueError("not a JSON object")
        reply = dict(reply)
        if "v" in reply:
            _plain(reply["v"])
        return reply
    except (ValueError, TypeError, RecursionError) as e:  # TypeError: an unhashable set element or dict key
        raise BadReply(f"not a value: {str(e)[:100]}") from None


def plain(v):
    """A parent value as exact plain types (a Counter as a dict, a deque as a list), or BadReply."""
    t = type(v)
    if v is None or t in (bool, int, float, str, bytes):
        return v
    if isinstance(v, (list, collections.deque)):
        return [plain(x) for x in v]
    if t in (tuple, set, frozenset):
        return t(plain(x) for x in v)
    if isinstance(v, dict):
        return {plain(k): plain(x) for k, x in v.items()}
    raise BadReply(f"cannot pass a {t.__name__} to the sandbox")


def encode(v, proc: str) -> tuple:
    """A parent value as the harness reads it: (0, plain data), (1, a name in that same process), (2, a module)."""
    if type(v) is Remote:
        if v.proc != proc:
            raise BadReply(f"cannot pass {v.src} to another process")
        return (1, v.src)
    if type(v) is PureModule:
        return (2, v.name)
    return (0, plain(v))


def holds(v, test) -> bool:
    """Whether `test` is true of a float anywhere in `v`."""
    if type(v) is float:
        return test(v)
    if isinstance(v, (list, tuple, set, frozenset)):
        return any(holds(x, test) for x in v)
    if isinstance(v, dict):
        return any(holds(k, test) or holds(x, test) for k, x in v.items())
    return False


# --- one sandboxed process, spoken to line by line ----------------------------------------------------------------


class Process:
    """The harness running `program` in a sandbox; `request` sends one line and reads one back before the run's
    deadline. Once the process is gone (exited, timed out, sent too much) every request fails at once."""

    def __init__(self, program: str, folder: Path, deadline: float, memory_mb: int, isolated: bool):
        self.folder, self.deadline, self.gone, self.timed_out = folder, deadline, None, False
        folder.mkdir()
        (folder / "program.py").write_text(program)
        (folder / "harness.py").write_text(HARNESS)
        argv = [PYTHON, "-I", "-S", "-B", "-u", "harness.py", str(max(1, int(deadline - time.monotonic()) + 1)),
                str(memory_mb), str(FILE_LIMIT)]
        if isolated:
            argv = bwrap_args(str(folder)) + argv
        self.group = _pids_cgroup()
        if self.group is not None:  # the shell joins the group, then becomes bwrap: every descendant is counted
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.group / "cgroup.procs"), *argv]
        self.buffer = b""
        try:
            with open(folder / "stderr.log", "wb") as err:  # bwrap's own complaints; the program's: output.log
                self.proc = subprocess.Popen(argv, cwd=folder, env={"PATH": "/usr/bin:/bin", "HOME": "/work"},
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                             start_new_session=True)
        except OSError:
            if self.group is not None:
                _remove_cgroup(self.group)
            raise
        for f in (self.proc.stdin, self.proc.stdout):
            os.set_blocking(f.fileno(), False)
        self.selector = selectors.DefaultSelector()
        with suppress(BadReply):  # gone already: timed out or ended while loading
            first = self._receive()
            if "ready" not in first:
                self._end(f"error: {str(first.get('error', 'the program did not start'))[:200]}")

    def request(self, op: str, src: str, args: list = (), kw: dict | None = None) -> dict:
        if self.gone is None:
            data = marshal.dumps((op, src, list(args), kw or {}))
            self._send(len(data).to_bytes(8, "little") + data)
        return self._receive()

    def _wait(self, fileobj, event) -> None:
        self.selector.register(fileobj, event)
        try:
            if not self.selector.select(max(0.0, self.deadline - time.monotonic())):
                self.timed_out = True
                self._end("timeout")
        finally:
            self.selector.unregister(fileobj)

    def _send(self, data: bytes) -> None:
        while data and self.gone is None:
            self._wait(self.proc.stdin, selectors.EVENT_WRITE)
            try:
                data = data[os.write(self.proc.stdin.fileno(), data):]
            except BlockingIOError:
                continue
            except OSError:  # BrokenPipe: it exited
                self._end(self._exit_reason())

    def _receive(self) -> dict:
        while self.gone is None and b"\n" not in self.buffer:
            self._wait(self.proc.stdout, selectors.EVENT_READ)
            if self.gone is not None:
                break
            try:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self._end(self._exit_reason())
            self.buffer += chunk
            if len(self.buffer) > FILE_LIMIT:
                self._end(f"error: a reply of more than {FILE_LIMIT} bytes")
        if self.gone is not None:
            raise BadReply(self.gone)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return decode(line)

    def _exit_reason(self) -> str:
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(0.0, min(1.0, self.deadline - time.monotonic())))
        if self.proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU, 128 + signal.SIGKILL, 128 + signal.SIGXCPU):
            self.timed_out = True
            return "timeout"
        last = (self.tail().strip().splitlines() or [""])[-1]
        return f"error: the process ended ({last[:150] or f'exit status {self.proc.returncode}'})"

    def tail(self, n: int = 2000) -> str:
        path = self.folder / "output.log"
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read(n).decode(errors="replace")

    def _end(self, reason: str) -> None:
        if self.gone is None:
            self.gone = reason

    def close(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent takes the namespace down with it
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with suppress(OSError):
                f.close()
        self.selector.close()
        if self.group is not None:
            _remove_cgroup(self.group)


# --- the tests, interpreted in the parent -------------------------------------------------------------------------

PURE_BUILTINS = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "chr", "complex", "dict", "divmod", "enumerate", "filter",
    "float", "format", "frozenset", "hash", "hex", "int", "isinstance", "issubclass", "iter", "len", "list", "map",
    "max", "min", "next", "oct", "ord", "pow", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str",
    "sum", "tuple", "type", "zip", "True", "False", "None", "ValueError", "TypeError", "Exception")}
PURE_BUILTINS["print"] = lambda *args, **kwargs: None  # tests print for debugging; the parent's stdout is not theirs
STRING_CONSTANTS = ("ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits", "octdigits",
                    "printable", "punctuation", "whitespace")
ITERTOOLS = ("accumulate", "chain", "combinations", "combinations_with_replacement", "compress", "count", "cycle",
             "dropwhile", "groupby", "islice", "pairwise", "permutations", "product", "repeat", "starmap",
             "takewhile", "zip_longest")
PURE_MODULES = ("math", "random", "string", "copy", "itertools", "collections", "functools")
# methods of these types run in the parent: they hold only plain data (never a candidate's object)
PURE_TYPES = (str, bytes, list, tuple, dict, set, frozenset, int, float, bool, complex, range, random.Random,
              collections.Counter, collections.OrderedDict, collections.deque)


class PureModule:
    """A stdlib module as the tests see it in the parent: only the members listed."""

    def __init__(self, name: str, members: dict):
        self.name, self.members = name, members


def pure_modules(rng: random.Random) -> dict[str, PureModule]:
    """The modules per run; `random`'s functions draw from `rng`, seeded, so a run's inputs are reproducible."""
    rand = {k: getattr(rng, k) for k in ("random", "randint", "randrange", "choice", "choices", "shuffle",
                                         "sample", "uniform", "gauss", "seed")}
    members = {
        "math": {k: getattr(math, k) for k in dir(math) if not k.startswith("_")},
        "random": {**rand, "Random": random.Random},
        "string": {k: getattr(string, k) for k in STRING_CONSTANTS},
        "copy": {"copy": copy.copy, "deepcopy": copy.deepcopy},
        "itertools": {k: getattr(itertools, k) for k in ITERTOOLS},
        "collections": {k: getattr(collections, k) for k in ("Counter", "OrderedDict", "deque")},
        "functools": {"reduce": functools.reduce},
    }
    return {name: PureModule(name, m) for name, m in members.items()}


class Remote:
    """A name (or attribute path) in a sandboxed process: "cand" the candidate's, "ref" the tests' own
    definitions. Calling it asks that process; its value is fetched only as plain data."""

    def __init__(self, run: "Run", proc: str, src: str):
        self.run, self.proc, self.src = run, proc, src

    def __call__(self, *args, **kwargs):
        return self.run.call(self, list(args), kwargs)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"<{self.proc}:{self.src}>"


class CandidateError(BadReply):
    """The sandboxed code raised."""


class Refused(BadReply):
    """The value that came back is not plain data."""


class Stop(Exception):
    """The rest of a top-level statement cannot run."""


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Return(Exception):
    pass


STATEMENTS = (ast.Assert, ast.Assign, ast.AugAssign, ast.Expr, ast.For, ast.If, ast.Pass, ast.Break, ast.Continue,
              ast.Import, ast.ImportFrom)
EXPRESSIONS = (ast.Constant, ast.Name, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.BinOp, ast.UnaryOp, ast.BoolOp,
               ast.Compare, ast.Call, ast.Attribute, ast.Subscript, ast.Slice, ast.IfExp, ast.ListComp, ast.SetComp,
               ast.DictComp, ast.GeneratorExp, ast.Lambda, ast.Starred, ast.JoinedStr, ast.FormattedValue)
BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.LShift: operator.lshift,
          ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.BitAnd: operator.and_,
          ast.MatMult: operator.matmul}
UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
           ast.Is: operator.is_, ast.IsNot: operator.is_not}
ORDERED = (ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)  # decide nothing about an infinity (see the docstring)


class Undecided(ValueError):
    """A comparison that says nothing about the candidate's value: its check fails, under a `not` too."""


def _asserts(node: ast.AST) -> int:
    return sum(isinstance(n, ast.Assert) for n in ast.walk(node))


def _targets_ok(t: ast.AST) -> bool:
    return isinstance(t, (ast.Name, ast.Subscript)) or (isinstance(t, (ast.Tuple, ast.List)) and
                                                         all(map(_targets_ok, t.elts)))


def supported(stmt: ast.stmt, in_function: bool = False) -> bool:
    """Whether the parent can interpret this statement (and all it holds)."""
    for node in ast.walk(stmt):
        if isinstance(node, ast.stmt) and not (isinstance(node, STATEMENTS) or
                                               (in_function and isinstance(node, ast.Return))):
            return False
        if isinstance(node, ast.expr) and not isinstance(node, EXPRESSIONS):
            return False
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            return False
        if isinstance(node, (ast.Assign, ast.For, ast.comprehension)) and not all(
                map(_targets_ok, node.targets if isinstance(node, ast.Assign) else [node.target])):
            return False
        if isinstance(node, ast.AugAssign) and not isinstance(node.target, ast.Name):
            return False
        if isinstance(node, ast.Lambda) and (node.args.defaults or node.args.vararg or node.args.kwarg or
                                             node.args.kwonlyargs or node.args.posonlyargs):
            return False
        if isinstance(node, ast.Import) and any(a.name not in PURE_MODULES for a in node.names):
            return False
        if isinstance(node, ast.ImportFrom) and (node.level or node.module not in PURE_MODULES or any(
                a.name not in pure_modules(random.Random(0))[node.module].members for a in node.names)):
            return False
    return True


def _check_def(stmt: ast.stmt) -> bool:
    """A function of the tests that asserts, with positional parameters only (HumanEval's `check(candidate)`)."""
    a = stmt.args if isinstance(stmt, ast.FunctionDef) else None
    return (a is not None and not stmt.decorator_list and not (a.defaults or a.vararg or a.kwarg or a.kwonlyargs
                                                               or a.posonlyargs) and _asserts(stmt) > 0)


class Plan:
    """Tests parsed and split (raises SyntaxError): each top-level statement is a unit the parent runs
    ("parent"), a call of a check function it inlines ("inline"), one only the candidate's process can run
    ("inside"; "inside_def" defines the function such a call needs), or a definition of the tests' own ("ref")."""

    def __init__(self, source: str):
        body = ast.parse(source).body
        called = {s.value.func.id for s in body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                  and isinstance(s.value.func, ast.Name)}
        defs = {s.name: s for s in body if _check_def(s) and s.name in called}
        self.checks = {name: s for name, s in defs.items() if all(supported(b, True) for b in s.body)}
        inside_defs = set(defs) - set(self.checks)
        self.units: list[tuple[str, ast.stmt]] = []
        ref: list[ast.stmt] = []
        parent_bound: set[str] = set()
        for s in body:
            call = s.value.func.id if (isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and
                                       isinstance(s.value.func, ast.Name)) else None
            if isinstance(s, ast.FunctionDef) and s.name in defs:
                if s.name in inside_defs:
                    self.units.append(("inside_def", s))
            elif call in self.checks:
                self.units.append(("inline", s))
            elif call in inside_defs:
                self.units.append(("inside", s))
            elif supported(s):
                self.units.append(("parent", s))
                if isinstance(s, (ast.Import, ast.ImportFrom)):
                    ref.append(s)  # the tests' own functions may use the module too
            elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
                ref.append(s)  # a definition asserts nothing until called
            elif _asserts(s) or {n.id for n in ast.walk(s) if isinstance(n, ast.Name)} & parent_bound:
                # it asserts, or changes what the parent holds (a `while` filling a list): the parent cannot run it
                self.units.append(("inside", s))
            else:
                ref.append(s)
            if self.units and self.units[-1][1] is s and self.units[-1][0] == "parent":
                parent_bound |= _bound(s)
        self.reference = "\n".join(ast.unparse(s) for s in ref)
        # a name passed to a check (`check(entry_point)`) is the candidate's everywhere, even where the tests'
        # own definitions have one of that name (HumanEval's prompt holds a stub of the entry point)
        checked = {a.id for kind, s in self.units if kind == "inline" for a in s.value.args if isinstance(a, ast.Name)}
        self.ref_names = {n for s in ref for n in _top_level_names(s)} - checked
        self.bound = {n for kind, s in self.units if kind in ("parent", "inline") for n in _bound(s)}
        self.bound |= {n for s in self.checks.values() for n in _bound(s) | {a.arg for a in s.args.args}}

    def counts(self) -> tuple[int, int]:
        """(asserts decided outside, asserts decided inside), counted in the source: an assert in a loop is one."""
        out = inside = 0
        for kind, s in self.units:
            if kind == "parent":
                out += _asserts(s)
            elif kind == "inline":
                out += _asserts(self.checks[s.value.func.id])
            elif kind == "inside":  # one at least: a statement that raises there fails its run
                inside += _asserts(s) or (self.inside_def(s) and _asserts(self.inside_def(s))) or 1
        return out, inside

    def inside_def(self, call: ast.stmt) -> ast.AST | None:
        name = call.value.func.id if isinstance(call, ast.Expr) and isinstance(call.value, ast.Call) and isinstance(
            call.value.func, ast.Name) else None
        return next((s for kind, s in self.units if kind == "inside_def" and s.name == name), None)


def _bound(stmt: ast.AST) -> set[str]:
    """Names a statement the parent runs binds: assigned, loop and comprehension targets, imports."""
    out = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return out


def _top_level_names(stmt: ast.AST) -> set[str]:
    """Names a statement of the tests' own process binds at module level (not inside its functions, classes or
    comprehensions)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, ast.Name):
        return {stmt.id} if isinstance(stmt.ctx, ast.Store) else set()
    if isinstance(stmt, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        return set()
    return {n for child in ast.iter_child_nodes(stmt) for n in _top_level_names(child)}


def count_checks(tests: str) -> tuple[int, int]:
    """(asserts the parent decides, asserts only the candidate's process can decide) in a test source."""
    return Plan(tests).counts()


class Run:
    """One candidate against one test source: the parent walks the units, asking the candidate's process (and,
    when a check calls one, the tests' own process) for values."""

    def __init__(self, tests: Plan, code: str, folder: Path, timeout_s: float, memory_mb: int, isolated: bool,
                 allow_inside: bool):
        self.tests, self.code, self.folder, self.allow_inside = tests, code, folder, allow_inside
        self.deadline, self.memory_mb, self.isolated = time.monotonic() + timeout_s, memory_mb, isolated
        self.modules = pure_modules(random.Random(0))
        self.env: ChainMap = ChainMap({})
        self.procs: dict[str, Process] = {}
        self.passed = self.outside = self.inside = 0
        self.first_failure: str | None = None
        self.timed_out = False

    # processes
    def process(self, name: str) -> Process:
        if name not in self.procs:
            program = self.code if name == "cand" else self.tests.reference
            self.procs[name] = Process(program, self.folder / name, self.deadline, self.memory_mb, self.isolated)
        return self.procs[name]

    def close(self) -> None:
        for p in self.procs.values():
            p.close()

    def _reply(self, r: Remote, op: str, args: list = (), kw: dict | None = None) -> object:
        reply = self.process(r.proc).request(op, r.src, args, kw)
        if "error" in reply:
            raise CandidateError(str(reply["error"])[:200])
        if "refused" in reply:
            raise Refused(f"{r.src} gave no plain data ({str(reply['refused'])[:100]})")
        if op == "exec" and reply.get("ok") is True:
            return None
        if "v" not in reply:
            raise BadReply("no value in the reply")
        return reply["v"]

    def call(self, r: Remote, args: list, kwargs: dict) -> object:
        value = self._reply(r, "call", [encode(a, r.proc) for a in args],
                            {k: encode(v, r.proc) for k, v in kwargs.items()})
        if value is CALLABLE:
            raise Refused(f"{r.src} returned a function")
        return value

    def fetch(self, r: Remote) -> object:
        value = self._reply(r, "eval")
        return r if value is CALLABLE else value  # a function stays a reference: calling it asks its process

    # the run
    def outcome(self) -> Outcome:
        cand = self.process("cand")
        for kind, stmt in self.tests.units:
            if time.monotonic() > self.deadline:
                self.timed_out = True
            if self.timed_out:
                self.record(False, "timeout", inside=kind == "inside")
                continue
            try:
                if kind == "parent":
                    self.stmt(stmt, self.env)
                elif kind == "inline":
                    self.inline(stmt.value, self.env)
                elif kind == "inside_def" and self.allow_inside:
                    with suppress(BadReply):  # the call that needs it fails instead
                        self.exec_inside(stmt, self.env)
                elif kind == "inside":
                    self.inside_check(stmt)
            except Stop as e:
                self.record(False, str(e))
        run = self.outside + self.inside
        timed_out = self.timed_out or any(p.timed_out for p in self.procs.values())
        if run and self.passed == run:
            reason = "passed"
        elif timed_out:
            reason = "timeout"
        elif cand.gone and cand.gone.startswith("error"):
            reason = cand.gone
        else:
            reason = f"failed: {self.first_failure}" if run else "failed: the tests contain no check"
        return Outcome(bool(run) and self.passed == run, reason[:300], self.passed, run, self.outside, self.inside,
                       cand.tail(OUTPUT_TAIL))

    def record(self, ok: bool, why: str | None, inside: bool = False) -> None:
        self.passed += ok
        self.inside += inside
        self.outside += not inside
        if not ok and self.first_failure is None:
            self.first_failure = why

    def inside_check(self, stmt: ast.stmt) -> None:
        if not self.allow_inside:
            self.record(False, f"not run: {ast.unparse(stmt)[:80]!r} can only be decided inside the candidate's "
                        "process (allow_inside_checks is false)", inside=True)
            return
        try:
            self.exec_inside(stmt, self.env)
            self.record(True, None, inside=True)
        except BadReply as e:
            self.record(False, f"{ast.unparse(stmt)[:80]}: {e}", inside=True)

    def exec_inside(self, stmt: ast.stmt, env) -> None:
        free = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)} & set(env)
        bind = {}
        for name in free:
            with suppress(BadReply):
                bind[name] = encode(env[name], "cand")
        self._reply(Remote(self, "cand", ast.unparse(stmt)), "exec", [], bind)

    def inline(self, call: ast.Call, env) -> None:
        """A check function's body with its parameters bound: a bare name passed in (`check(entry_point)`) is the
        candidate's function, whatever else the tests call by that name."""
        fn = self.tests.checks[call.func.id]
        params = [a.arg for a in fn.args.args]
        if len(call.args) != len(params) or call.keywords:
            raise Stop(f"{ast.unparse(call)}: {fn.name} takes {len(params)} arguments")
        try:
            values = [Remote(self, "cand", a.id) if isinstance(a, ast.Name) and a.id not in env else self.ev(a, env)
                      for a in call.args]
        except (BadReply, Exception) as e:
            raise Stop(f"{ast.unparse(call)}: {type(e).__name__}: {e}") from None
        with suppress(_Return):
            self.block(fn.body, env.new_child(dict(zip(params, values))))

    # statements
    def block(self, body: list[ast.stmt], env) -> None:
        for s in body:
            self.stmt(s, env)

    def stmt(self, s: ast.stmt, env) -> None:
        if time.monotonic() > self.deadline:
            self.timed_out = True
            raise Stop("timeout")
        if isinstance(s, ast.Assert):
            return self.check(s, env)
        if isinstance(s, (ast.Pass, ast.Break, ast.Continue, ast.Return)):
            if isinstance(s, ast.Pass):
                return
            raise {ast.Break: _Break, ast.Continue: _Continue, ast.Return: _Return}[type(s)]()
        try:
            if isinstance(s, ast.Expr):
                if not isinstance(s.value, ast.Constant):  # a docstring is no statement
                    with suppress(Refused):  # a value nobody compares may be anything
                        self.ev(s.value, env)
            elif isinstance(s, ast.Assign):
                value = self.ev(s.value, env)
                for t in s.targets:
                    self.bind(t, value, env)
            elif isinstance(s, ast.AugAssign):
                env[s.target.id] = BINOPS[type(s.op)](self.lookup(s.target.id, env), self.ev(s.value, env))
            elif isinstance(s, (ast.Import, ast.ImportFrom)):
                for a in s.names:
                    if isinstance(s, ast.Import):
                        env[a.asname or a.name] = self.modules[a.name]
                    else:
                        env[a.asname or a.name] = self.modules[s.module].members[a.name]
            elif isinstance(s, ast.If):
                self.block(s.body if self.ev(s.test, env) else s.orelse, env)
                return
            elif isinstance(s, ast.For):
                items = list(self.ev(s.iter, env))
        except (Stop, _Break, _Continue, _Return):
            raise
        except (BadReply, Exception) as e:
            raise Stop(f"{ast.unparse(s).splitlines()[0][:100]}: {type(e).__name__}: {e}") from None
        if isinstance(s, ast.For):
            for item in items:
                try:
                    self.bind(s.target, item, env)
                    self.block(s.body, env)
                except _Break:
                    break
                except _Continue:
                    continue
                except TypeError as e:  # unpacking the item
                    raise Stop(f"for {ast.unparse(s.target)}: {e}") from None
            else:
                self.block(s.orelse, env)

    def check(self, s: ast.Assert, env) -> None:
        """One check: its truth computed here, from plain values (the message is never evaluated)."""
        try:
            ok, why = bool(self.ev(s.test, env)), None
        except RecursionError:
            ok, why = False, "RecursionError"
        except Stop:
            raise
        except (BadReply, Exception) as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        self.record(ok, None if ok else f"assert {ast.unparse(s.test)[:150]}" + (f" ({why[:150]})" if why else ""))

    def bind(self, target: ast.AST, value, env) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
            return
        if isinstance(target, ast.Subscript):  # an item of a value the parent holds (`data[0] = 5`)
            self.ev(target.value, env)[self.ev(target.slice, env)] = value
            return
        values = list(value)
        if len(values) != len(target.elts):
            raise TypeError(f"cannot unpack {len(values)} values into {len(target.elts)}")
        for t, v in zip(target.elts, values):
            self.bind(t, v, env)

    # expressions
    def lookup(self, name: str, env):
        """A name: the tests' own values first, then their definitions, the pure modules and builtins; any other
        name is the candidate's."""
        if name in env:
            return env[name]
        if name in self.tests.bound:
            raise NameError(f"{name!r} is not bound yet")
        if name in self.tests.ref_names:
            return Remote(self, "ref", name)
        if name in self.modules:
            return self.modules[name]
        if name in PURE_BUILTINS:
            return PURE_BUILTINS[name]
        return Remote(self, "cand", name)

    def callee(self, node: ast.expr, env):
        """What a name or attribute denotes, without fetching a remote one."""
        if isinstance(node, ast.Name):
            return self.lookup(node.id, env)
        if isinstance(node, ast.Attribute):
            base = self.callee(node.value, env)
            if isinstance(base, Remote):
                return Remote(self, base.proc, f"{base.src}.{node.attr}")
            if isinstance(base, PureModule):
                if node.attr not in base.members:
                    raise AttributeError(f"{base.name}.{node.attr} is not available to tests")
                return base.members[node.attr]
            if type(base) not in PURE_TYPES:
                raise TypeError(f"no attribute {node.attr!r} of a {type(base).__name__} in the tests")
            return getattr(base, node.attr)
        if isinstance(node, ast.Call) and all(isinstance(a, ast.Constant) for a in node.args) and not node.keywords:
            f = self.callee(node.func, env)  # `Solution().method(x)`: the object stays in its process
            if isinstance(f, Remote):
                return Remote(self, f.proc, f"{f.src}({', '.join(ast.unparse(a) for a in node.args)})")
        return self.ev(node, env)

    def ev(self, node: ast.expr, env):
        """An expression's value, as plain data (a remote function stays a reference)."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            v = self.callee(node, env)
            return self.fetch(v) if isinstance(v, Remote) else v
        if isinstance(node, ast.Call):
            f = self.callee(node.func, env)
            args, kwargs = [], {}
            for a in node.args:
                if isinstance(a, ast.Starred):
                    args.extend(self.ev(a.value, env))
                else:
                    args.append(self.ev(a, env))
            for k in node.keywords:
                if k.arg is None:
                    kwargs.update(self.ev(k.value, env))
                else:
                    kwargs[k.arg] = self.ev(k.value, env)
            if isinstance(f, Remote):
                return self.call(f, args, kwargs)
            if isinstance(f, PureModule):
                raise TypeError(f"module {f.name} is not callable")
            return f(*args, **kwargs)
        if isinstance(node, ast.Compare):
            left = self.ev(node.left, env)
            for op, right_node in zip(node.ops, node.comparators):
                right = self.ev(right_node, env)
                if not isinstance(op, (ast.Is, ast.IsNot)) and (holds(left, math.isnan) or holds(right, math.isnan)):
                    raise Undecided("a NaN compares with nothing")
                if isinstance(op, ORDERED) and (holds(left, math.isinf) or holds(right, math.isinf)):
                    raise Undecided(f"an infinity decides no {type(op).__name__}")
                if not COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BinOp):
            return BINOPS[type(node.op)](self.ev(node.left, env), self.ev(node.right, env))
        if isinstance(node, ast.UnaryOp):
            return UNARY[type(node.op)](self.ev(node.operand, env))
        if isinstance(node, ast.BoolOp):
            for value_node in node.values:
                value = self.ev(value_node, env)
                if bool(value) == isinstance(node.op, ast.Or):
                    return value
            return value
        if isinstance(node, ast.IfExp):
            return self.ev(node.body if self.ev(node.test, env) else node.orelse, env)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = []
            for e in node.elts:
                items.extend(self.ev(e.value, env)) if isinstance(e, ast.Starred) else items.append(self.ev(e, env))
            return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict):
            out = {}
            for k, v in zip(node.keys, node.values):
                if k is None:
                    out.update(self.ev(v, env))
                else:
                    out[self.ev(k, env)] = self.ev(v, env)
            return out
        if isinstance(node, ast.Subscript):
            return self.ev(node.value, env)[self.ev(node.slice, env)]
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else self.ev(p, env) for p in (node.lower, node.upper, node.step)))
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            return self.comprehension(node, env)
        if isinstance(node, ast.Lambda):
            return self.function(node, env)
        if isinstance(node, ast.JoinedStr):
            return "".join(str(self.ev(v, env)) for v in node.values)
        if isinstance(node, ast.FormattedValue):
            value = self.ev(node.value, env)
            value = {-1: lambda x: x, 115: str, 114: repr, 97: ascii}[node.conversion](value)
            return format(value, self.ev(node.format_spec, env) if node.format_spec else "")
        raise TypeError(f"{type(node).__name__} is not evaluated in the parent")

    def comprehension(self, node, env):
        scope, out = env.new_child(), []

        def loops(i):
            if i == len(node.generators):
                yield
                return
            g = node.generators[i]
            for item in list(self.ev(g.iter, scope if i else env)):
                self.bind(g.target, item, scope)
                if all(self.ev(c, scope) for c in g.ifs):
                    yield from loops(i + 1)

        for _ in loops(0):
            out.append((self.ev(node.key, scope), self.ev(node.value, scope)) if isinstance(node, ast.DictComp)
                       else self.ev(node.elt, scope))
        return {ast.ListComp: list, ast.GeneratorExp: list, ast.SetComp: set, ast.DictComp: dict}[type(node)](out)

    def function(self, node: ast.Lambda, env):
        params = [a.arg for a in node.args.args]

        def f(*args):
            if len(args) != len(params):
                raise TypeError(f"lambda takes {len(params)} arguments, got {len(args)}")
            return self.ev(node.body, env.new_child(dict(zip(params, args))))
        return f


def run_tests(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512, isolated: bool = True,
              allow_inside: bool = False) -> Outcome:
    """Run `code`, then decide `tests` (see `Plan`) within `timeout_s` of wall time in all; passed means every
    check passed. `allow_inside`: also run the checks only the candidate's process can decide."""
    parsed = Plan(tests)
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        run = Run(parsed, code, Path(tmp), timeout_s, memory_mb, isolated, allow_inside)
        try:
            return run.outcome()
        except OSError as e:
            return Outcome(False, f"error: could not start the sandbox: {e}", 0, 0)
        finally:
            run.close()


def run_many(jobs: list[tuple[str, str]], timeout_s: float, memory_mb: int, workers: int | None = None,
             isolated: bool = True, allow_inside: bool = False) -> list[Outcome]:
    """`run_tests` over (code, tests) pairs, several processes at once; outcomes in input order."""
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda j: run_tests(j[0], j[1], timeout_s, memory_mb, isolated, allow_inside), jobs))


# --- isolation ----------------------------------------------------------------------------------------------------

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


