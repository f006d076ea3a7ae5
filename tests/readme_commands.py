"""The commands the README and docs/*.md show in ```bash blocks, and how to run each against a given recipe.

tests/test_round_e2e.py runs them: its round fixture is the README's own `make round N=1` line, and every other
command then runs against a copy of that round. tests/test_readme.py checks, without running anything, that every
command is one this module knows how to run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = "recipes/tiny.yaml"
ROUND1 = "make round N=1"  # the end-to-end fixture runs exactly this line
SKIPPED = {"make test"}  # would run this test suite inside itself
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
    backslash continuations joined."""
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
        return words, env
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
