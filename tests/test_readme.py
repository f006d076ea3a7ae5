"""The README and docs/ pages stay true to the code: every command in their ```bash blocks is one the end-to-end
test can run (tests/test_round_e2e.py runs them all against its round), their links resolve and the recipe keys
they name exist. Nothing here trains a model."""

import re
from pathlib import Path

import pytest

from alignment.explain import explain
from readme_commands import NOT_RUN, PAGES, ROOT, ROUND1, SKIPPED, argv, commands, inline_commands, stray_commands


def test_every_documented_command_is_runnable_against_a_test_recipe():
    found = [c for _, c in commands()]
    assert ROUND1 in found and SKIPPED <= set(found)
    for _, command in commands():
        if command not in SKIPPED:
            argv(command, Path("/tmp/shrunken.yaml"))  # raises for a command the test could not run


def test_the_harness_swaps_the_recipe_and_refuses_what_it_cannot_run():
    args, env = argv(".venv/bin/align stats 1 --recipe recipes/tiny.yaml", Path("/x/e2e.yaml"))
    assert args[0] == str(ROOT / ".venv/bin/align") and args[1:] == ["stats", "1", "--recipe", "/x/e2e.yaml"]
    args, env = argv('make round N=2 ARGS="sft.learning_rate=5e-4"', Path("/x/e2e.yaml"))
    assert args == ["make", "round", "N=2", "ARGS=sft.learning_rate=5e-4"] and env["RECIPE"] == "/x/e2e.yaml"
    with pytest.raises(ValueError, match="name the recipe"):
        argv(".venv/bin/align stage sft --round 1", Path("/x/e2e.yaml"))  # would run the real tiny recipe
    with pytest.raises(ValueError, match="does not know how to run"):
        argv("rm -rf runs", Path("/x/e2e.yaml"))


def test_no_command_hides_outside_a_bash_block():
    assert stray_commands() == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        path = target.split("#")[0]
        if path and "://" not in path:
            assert (page.parent / path).exists(), f"{page.name}: broken link {target}"


def test_the_recipe_keys_the_docs_name_exist():
    text = (ROOT / "docs" / "details.md").read_text()
    table = text.split("The keys that matter most:")[1].split("\n\n")[1]
    keys = [k for row in table.splitlines()[2:] for k in re.findall(r"`([a-z_.]+)`", row.split("|")[1])]
    assert len(keys) >= 15
    for key in keys:
        explain(key)  # raises InputError naming the nearest keys


def test_inline_commands_are_found_and_each_is_run_or_says_why_not(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `make plan RECIPE=recipes/llama3.1-70b.yaml` or `make explain\nKEY=dpo.beta`; the\n"
                    "`align round` command; `.venv/bin/align stats 1 --recipe recipes/tiny.yaml`; `dpo.beta`.\n"
                    "```bash\nmake status  # `make eval` here is in a block, not prose\n```\n")
    # a span wrapped over a line break counts; a bare subcommand name and a key do not; nothing inside a fence
    assert inline_commands([page]) == [("page.md:1", "make plan RECIPE=recipes/llama3.1-70b.yaml"),
                                       ("page.md:1", "make explain KEY=dpo.beta"),
                                       ("page.md:3", ".venv/bin/align stats 1 --recipe recipes/tiny.yaml")]
    with pytest.raises(ValueError, match="NOT_RUN"):  # its own recipe: the test could not swap it
        argv("make plan RECIPE=recipes/llama3.1-70b.yaml", Path("/x/e2e.yaml"))
    args, env = argv("make validate RECIPE=recipes/tiny.yaml", Path("/x/e2e.yaml"))
    assert args == ["make", "validate", "RECIPE=/x/e2e.yaml"]
    # every inline command of the pages is run by the end-to-end test or listed with a reason, and no listed
    # command has left the pages (a stale reason would hide nothing and mislead)
    found = {c for _, c in inline_commands()} | {c for _, c in commands()}
    for _, command in inline_commands():
        if command not in NOT_RUN:
            argv(command, Path("/x/e2e.yaml"))
    assert set(NOT_RUN) <= found, set(NOT_RUN) - found
