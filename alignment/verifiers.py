"""Rule-based verifiers: a final-answer match and Python code run against unit tests.

A verifier applies to a prompt when the prompt has the field it reads (`answer` or `tests`) and, if the verifier
names a `capability`, the prompt's capability is that one. Where it does not apply its score is absent (not 0), so
a coding prompt is never failed by the math check.
"""

from __future__ import annotations

import ast
import math
import re

from alignment import sandbox
from alignment.config import InputError, VerifierConfig

FIELD = {"answer": "answer", "code": "tests"}  # the prompt field each kind of verifier reads


def applies(v: VerifierConfig, prompt: dict) -> bool:
    right_capability = v.capability is None or prompt.get("capability") == v.capability
    return right_capability and isinstance(prompt.get(FIELD[v.kind]), str)


def final_answer(response: str, answer_regex: str) -> str | None:
    """The last match of `answer_regex` (its first group if it has groups): a worked answer restates the
    operands first ("12 + 7 = 19")."""
    found = re.findall(answer_regex, response)
    if not found:
        return None
    last = found[-1]
    return (last[0] if isinstance(last, tuple) else last).strip()


def answer_matches(response: str, answer: str, v: VerifierConfig) -> float:
    got = final_answer(response, v.answer_regex)
    if got is None:
        return 0.0
    if v.match == "exact":
        return float(got == answer.strip())
    try:
        a, b = float(got.replace(",", "")), float(answer.strip().replace(",", ""))
    except ValueError:
        return 0.0
    return float(math.isfinite(a) and abs(a - b) <= v.tolerance)


def verify(verifiers: list[VerifierConfig], prompts: list[dict], responses: list[str],
           checks: dict[str, dict] | None = None) -> dict[str, list]:
    """{verifier name: [1.0 | 0.0 | None per response]}; None where the verifier does not apply. `checks`, if
    given, receives per code verifier how many checks its runs decided outside and inside the candidate's
    process (a check in a loop counts once per time it ran)."""
    out: dict[str, list] = {}
    for v in verifiers:
        if v.kind == "answer":
            out[v.name] = [answer_matches(r, p["answer"], v) if applies(v, p) else None
                           for p, r in zip(prompts, responses)]
            continue
        out[v.name] = [None] * len(responses)
        todo = [i for i, p in enumerate(prompts) if applies(v, p)]
        outcomes = run_code(v, [(sandbox.extract_code(responses[i]), prompts[i]["tests"]) for i in todo])
        for i, o in zip(todo, outcomes):
            out[v.name][i] = o.tests_passed / o.tests_run if v.score == "fraction" and o.tests_run else float(o.passed)
        if checks is not None:
            checks[v.name] = {"decided_outside": sum(o.decided_outside for o in outcomes),
                              "decided_inside": sum(o.decided_inside for o in outcomes),
                              "allow_inside_checks": v.allow_inside_checks}
    return out


def run_code(v: VerifierConfig, jobs: list[tuple[str, str]]) -> list[sandbox.Outcome]:
    """(code, tests) pairs run as the verifier says, refused where the code cannot be isolated as it asks; a
    check only the candidate's process can decide runs only where the verifier allows it (else it fails)."""
    check_isolation([v])
    return sandbox.run_many(jobs, v.timeout_s, v.memory_mb, isolated=not v.unsafe_no_isolation,
                            allow_inside=v.allow_inside_checks)


def code_feedback(verifiers: list[VerifierConfig], items: list[tuple[dict, str]], chars: int
                  ) -> list[tuple[bool, float, str]]:
    """Execution feedback for (prompt, response) pairs: (passed every code verifier that applies, the share of
    their checks that passed, the error to show the teacher: each failing verifier's reason (the first failing
    check, a timeout, how the program stopped) and the tail of the program's stdout and stderr, cut to the last
    `chars` characters). A pair no code verifier applies to passes with share 1.0 and no error."""
    results = [[True, 0, 0, []] for _ in items]  # passed, checks passed, checks run, errors
    for v in verifiers:
        todo = [i for i, (p, _) in enumerate(items) if v.kind == "code" and applies(v, p)]
        outcomes = run_code(v, [(sandbox.extract_code(items[i][1]), items[i][0]["tests"]) for i in todo])
        for i, o in zip(todo, outcomes):
            r = results[i]
            r[1], r[2] = r[1] + o.tests_passed, r[2] + o.tests_run
            if not o.passed:
                r[0] = False
                out = o.output.strip()
                r[3].append(f"{o.tests_passed} of {o.tests_run} checks passed; {o.reason}"
                            + (f"\nOutput:\n{out}" if out else ""))
    feedback = []
    for passed, ok, run, errors in results:
        text = "\n\n".join(errors)
        feedback.append((passed, ok / run if run else float(passed),
                         text if len(text) <= chars else "..." + text[-(chars - 3):]))
    return feedback


def check_counts(verifiers: list[VerifierConfig], rows) -> dict[str, tuple[int, int]]:
    """{code verifier name: (asserts decided outside, asserts decided inside)} over the prompts it applies to, as
    written (an assert in a loop is one), for `align validate`'s share."""
    out = {}
    for v in verifiers:
        if v.kind == "code":
            counts = [sandbox.count_checks(r["tests"]) for r in rows if applies(v, r)]
            out[v.name] = (sum(c[0] for c in counts), sum(c[1] for c in counts))
    return out


def check_prompt_fields(verifiers: list[VerifierConfig], rows: list[dict], path) -> None:
    """Before any work: every prompt a code verifier will run has tests that parse, and a verifier bound to a
    capability finds prompts of it with the field it reads."""
    for v in verifiers:
        hits = [r for r in rows if applies(v, r)]
        if not hits:
            which = f"capability {v.capability!r} and " if v.capability is not None else ""
            raise InputError(f"reward.verifiers[{v.name}]: no prompt in {path} has {which}a {FIELD[v.kind]!r} "
                             "field (a string); the check would never run")
        if v.kind == "code":
            for r in hits:
                try:
                    tests = sandbox.Plan(r["tests"])
                except SyntaxError as e:
                    raise InputError(f"{path}: prompt {r['prompt_id']!r}: tests do not parse as Python "
                                     f"(line {e.lineno}: {e.msg}); verifier {v.name!r} would fail every sample"
                                     ) from None
                outside, inside = tests.counts()
                if not outside + inside:
                    raise InputError(f"{path}: prompt {r['prompt_id']!r}: tests hold no assert that runs (only "
                                     f"imports, definitions, assignments); verifier {v.name!r} would fail every "
                                     "sample")
                if inside and not v.allow_inside_checks:
                    stmt = next(s for kind, s in tests.units if kind == "inside")
                    raise InputError(f"{path}: prompt {r['prompt_id']!r}: {inside} of {outside + inside} asserts "
                                     f"can only be decided inside the candidate's process, which can forge them "
                                     f"(line {stmt.lineno}: {ast.unparse(stmt).splitlines()[0][:60]!r}: a "
                                     f"statement the parent cannot interpret); rewrite them, or set "
                                     f"reward.verifiers[{v.name}].allow_inside_checks: true")


def check_examples(verifiers: list[VerifierConfig], system_prompts: dict[str, str]) -> None:
    """Before any work: a verifier bound to a capability whose system prompt asks for a format gives an example in
    that format, and accepts it; so a prompt and a verifier that disagree (Answer: 7 against \\boxed{7}) are
    caught before a round spends its samples on zeros."""
    for i, v in enumerate(verifiers):
        key = f"reward.verifiers[{i}] ({v.name})"
        if v.example is None:
            if v.capability in system_prompts:
                raise InputError(f"{key}.example: required, since teacher.system_prompts[{v.capability!r}] asks for a "
                                 "format: give a response written as that prompt asks, and its answer (or tests)")
            continue
        if v.kind == "answer" and answer_matches(v.example.response, v.example.answer, v) != 1.0:
            got = final_answer(v.example.response, v.answer_regex)
            raise InputError(f"{key}: rejects its own example: answer_regex {v.answer_regex!r} reads "
                             f"{got!r} from example.response, expected {v.example.answer!r}")
        if v.kind == "code":
            (o,) = run_code(v, [(sandbox.extract_code(v.example.response), v.example.tests)])
            if not o.passed:
                raise InputError(f"{key}: rejects its own example: the code in example.response passes "
                                 f"{o.tests_passed} of {o.tests_run} of example.tests")


def check_isolation(verifiers: list[VerifierConfig]) -> None:
    """Before any work: a code verifier runs model-written code only where bubblewrap can isolate it, unless its
    recipe gave that up explicitly."""
    for v in verifiers:
        if v.kind == "code" and not v.unsafe_no_isolation and (problem := sandbox.isolation_problem()):
            raise InputError(f"reward.verifiers[{v.name}]: {problem}")


def isolation_stats(verifiers: list[VerifierConfig]) -> dict[str, str]:
    """{code verifier name: how its runs are isolated here}, for the score stage's manifest."""
    return {v.name: sandbox.isolation(not v.unsafe_no_isolation) for v in verifiers if v.kind == "code"}
