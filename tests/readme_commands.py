"""The commands the README and docs/*.md show, in ```bash blocks and inline (a code span that starts like a
command: `make ...`, `.venv/bin/...`, `python ...`, or `align` with arguments), and how to run each against a given
recipe. An inline command that cannot run here is listed in NOT_RUN with the reason.

tests/test_round_e2e.py runs them: its round fixture is the README's own `make round N=1` line, and every other
command then runs against a copy of that round. tests/test_readme.py checks, without running anything, that every
command is one this module knows how to run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = "recipes/tiny.yaml"
ROUND1 = "make round N=1"  # the end-to-end fixture runs exactly this line
# Commands a reader may copy that the test does not run, and why; each must still appear on a page.
NOT_RUN = {
    "make test": "runs this test suite inside itself",
    "make test TEST_WORKERS=1": "runs this test suite inside itself",
    "make test-fast": "runs this test suite inside itself",
    "make curve ROUNDS=6 SEEDS=3": "18 rounds, about 40 minutes; its figures are in bench/results/curve.json",
    "make round N=1 RECIPE=recipes/smollm2-135m.yaml": "about 10 minutes; tests/test_real_model.py runs this recipe "
                                                      "shrunken to 16 prompts",
    "make plan RECIPE=recipes/llama3.1-70b.yaml": "reads the 70B models' configs from the Hub, which this machine "
                                                 "cannot reach; tests/test_memory_plan.py plans this recipe on the "
                                                 "published configs laid out in a local Hub cache",
    "make round N=1 ARGS=teacher.backend=vllm": "reruns the whole round through vLLM (minutes); "
                                               "tests/test_vllm_generate.py runs the vllm backend",
    "make round N=2 'ARGS=sft.learning_rate=5e-4 sampling.num_samples=8'": "trains another round 2 (minutes); the "
                                                                         "README's `make round N=2` runs round 2",
    "python -m alignment.tasks.arithmetic": "the module `make data` runs (a bash block of docs/details.md); "
                                            "tests/test_prompts.py regenerates its files byte for byte",
}
SKIPPED = set(NOT_RUN)
# `align` subcommands that read a recipe: a documented line must name recipes/tiny.yaml, which the test swaps for
# its shrunken recipe (without it, the line would run the real tiny recipe: minutes of bootstrap).
RECIPE_COMMANDS = {"validate", "round", "eval", "status", "report", "stats", "stage", "plan"}
ALIGN = {".venv/bin/align", "align"}


def fences(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the opening fence, lines) for each fenced block of a Markdown file."""
    blocks, current = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = (line[3:].strip(), n, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"{path}: the fence opened at line {current[1]} is never closed"
    return blocks


def commands(pages: list[Path] = PAGES) -> list[tuple[str, str]]:
    """("README.md:12", command) for every command of every ```bash block, in page order, comments removed and
    backslash continuations joined; then every inline command."""
    out = []
    for page in pages:
        for lang, start, lines in fences(page):
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            text = "\n".join(lines).replace("\\\n", " ")
            for i, line in enumerate(text.splitlines()):
                words = shlex.split(line, comments=True)
                if words:
                    out.append((f"{page.relative_to(ROOT)}:{start + 1 + i}", shlex.join(words)))
    return out + inline_commands(pages)


INLINE_STARTS = ("make ", ".venv/bin/", "python ", "align ")


def inline_commands(pages: list[Path] = PAGES) -> list[tuple[str, str]]:
    """("README.md:98", command) for every code span in prose that starts like a command. `align <subcommand>`
    alone names a command (it runs nothing without its arguments), so only `align` with arguments counts; a span
    may wrap across a line break, as Markdown allows."""
    out = []
    for page in pages:
        text, in_fence = page.read_text().splitlines(), False
        prose = []
        for n, line in enumerate(text, 1):
            if line.startswith("```"):
                in_fence = not in_fence
            prose.append("" if in_fence or line.startswith("```") else line)
        joined = "\n".join(prose)
        for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
            span = " ".join(m.group(1).split())
            if not span.startswith(INLINE_STARTS) or (span.startswith("align ") and len(span.split()) <= 2):
                continue
            name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name
            out.append((f"{name}:{joined.count(chr(10), 0, m.start()) + 1}", shlex.join(shlex.split(span))))
    return out


def stray_commands(pages: list[Path] = PAGES) -> list[str]:
    """Command-like lines in fences that are not bash blocks: they would escape the test."""
    starts = ("$ ", "make ", *(a + " " for a in ALIGN), "python ", ".venv/")
    return [f"{page.relative_to(ROOT)}:{start}: {line.strip()}" for page in pages
            for lang, start, lines in fences(page) if lang not in ("bash", "sh", "shell", "console")
            for line in lines if line.strip().startswith(starts)]


def argv(command: str, recipe: Path) -> tuple[list[str], dict[str, str]]:
    """How the test runs a documented command against `recipe`: `make` lines with RECIPE in the environment (the
    Makefile reads `RECIPE ?=`), `align` lines with recipes/tiny.yaml replaced by it. Anything else is refused, so
    a new kind of command in the docs needs a decision here rather than going untested."""
    words = shlex.split(command)
    env = dict(os.environ)
    if words[0] == "make":
        env["RECIPE"] = str(recipe)
        if other := [w for w in words if w.startswith("RECIPE=") and w != f"RECIPE={TINY}"]:
            raise ValueError(f"{command!r}: names {other[0]}, which the test cannot swap for its own recipe; "
                             "list it in NOT_RUN with the reason")
        return [f"RECIPE={recipe}" if w == f"RECIPE={TINY}" else w for w in words], env
    if words[0] in ALIGN:
        sub = words[1] if len(words) > 1 else ""
        if sub in RECIPE_COMMANDS and TINY not in words:
            raise ValueError(f"{command!r}: name the recipe ({TINY}) so the test can swap in its own")
        exe = [str(ROOT / ".venv/bin/align")] if words[0].startswith(".venv/") else [sys.executable, "-m",
                                                                                     "alignment.cli"]
        return exe + [str(recipe) if w == TINY else w for w in words[1:]], env
    raise ValueError(f"{command!r}: tests/readme_commands.py does not know how to run this against a test recipe")


def run(command: str, recipe: Path) -> subprocess.CompletedProcess:
    args, env = argv(command, recipe)
    if args[0] == "make":
        # Never let a test install: `make` would rebuild .venv if its stamp were stale.
        stamp = subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT, capture_output=True)
        assert stamp.returncode == 0, ".venv is missing or out of date: run `make test`, which installs it first"
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
