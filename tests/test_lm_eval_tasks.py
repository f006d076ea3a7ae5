"""`align validate` loads each lm-eval task the recipe names as lm-eval builds it, so a task whose modules cannot
import (ifeval without langdetect and immutabledict, the `lm_eval[ifeval]` extra) is refused before any work,
naming the task and the missing module, rather than failing in eval after every model has been served."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.cli import main as align

ROOT = Path(__file__).resolve().parents[1]
TASK = (ROOT / "recipes/lm_eval/arithmetic_local.yaml").read_text()


def local_task(folder: Path, utils: str) -> Path:
    """The tiny recipe's local task, its results computed by a function of its own utils.py (as lm-eval's bundled
    tasks do: `process_results: !function utils.process_results`)."""
    folder.mkdir()
    (folder / "arithmetic_local.yaml").write_text(TASK + "process_results: !function utils.process_results\n")
    (folder / "utils.py").write_text(utils + "\ndef process_results(doc, results):\n    return {'exact_match': 1.0}\n")
    return folder


def test_a_local_task_whose_module_cannot_import_is_refused_naming_it(tmp_path, capsys):
    bad = local_task(tmp_path / "bad", "import langdetect_that_is_not_installed")
    with pytest.raises(SystemExit):
        align(["validate", str(ROOT / "recipes/tiny.yaml"), f"eval.lm_eval_include_path={bad}"])
    err = capsys.readouterr().err
    assert "eval.lm_eval_tasks: task 'arithmetic_local' cannot be loaded" in err
    assert "imports the module 'langdetect_that_is_not_installed', which is not installed" in err
    # the same task with a module that imports: validates
    good = local_task(tmp_path / "good", "import json")
    align(["validate", str(ROOT / "recipes/tiny.yaml"), f"eval.lm_eval_include_path={good}"])
    assert "ok" in capsys.readouterr().out


HIDE = """
import contextlib, io, json, sys
from importlib.abc import MetaPathFinder
from alignment.cli import main

class Hide(MetaPathFinder):  # as if the package were not installed
    def __init__(self, name):
        self.name = name
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == self.name:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

runs = []
for hidden in ("langdetect", "immutabledict", "punkt_tab", None):  # one process: lm-eval's task index is built once
    if hidden in ("langdetect", "immutabledict"):
        sys.meta_path.insert(0, Hide(hidden))
    if hidden is None:  # nltk's data path with the folder that holds it (NLTK_DATA is an empty one until here)
        import nltk
        nltk.data.path.append(sys.argv[1])
    err, out, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main(["validate", "recipes/tiny.yaml", "eval.lm_eval_tasks=[ifeval]"])
        except SystemExit as e:
            code = e.code
    if hidden in ("langdetect", "immutabledict"):
        sys.meta_path.pop(0)
    runs.append({"hidden": hidden, "code": code, "err": err.getvalue(), "out": out.getvalue()})
print("RUNS " + json.dumps(runs))
"""


def test_ifeval_needs_its_extra_and_its_nltk_data_and_validates_with_both(tmp_path):
    """lm-eval's bundled ifeval: utils.py imports instructions.py (langdetect) and instructions_util.py
    (immutabledict), which downloads nltk's punkt_tab on import and goes on when it cannot (offline), leaving its
    checks to fail after the models were served. With either module hidden, validate names the task and the
    module; without punkt_tab, the data and how to get it; with requirements.lock installed and the data (a
    stand-in, trained here: tests/standins.py), it passes. (A subprocess: the hidden modules must not be imported
    already.)"""
    from standins import write_punkt_tab

    (tmp_path / "empty").mkdir()
    env = {**os.environ, "NLTK_DATA": str(tmp_path / "empty")}
    proc = subprocess.run([sys.executable, "-c", HIDE, str(write_punkt_tab(tmp_path / "nltk_data"))], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.split("RUNS ", 1)[1])
    for run in runs[:2]:
        assert run["code"] != 0, run
        assert "eval.lm_eval_tasks: task 'ifeval' cannot be loaded" in run["err"], run
        assert f"imports the module '{run['hidden']}', which is not installed" in run["err"], run
    assert runs[2]["code"] != 0 and ("error: eval.lm_eval_tasks: task 'ifeval' needs nltk's punkt_tab data, which "
                                     "lm-eval could not download here; run `python -m nltk.downloader punkt_tab`"
                                     ) in runs[2]["err"], runs[2]
    assert runs[3]["code"] == 0 and "recipes/tiny.yaml: ok" in runs[3]["out"], runs[3]


def test_the_lock_pins_ifevals_extra():
    """What lm-eval 0.4.13 declares for its ifeval extra is pinned in requirements.lock and asked for in
    pyproject.toml, so `make` installs it."""
    from importlib.metadata import requires

    extra = {r.split(";")[0].split(">")[0].split("=")[0].strip() for r in requires("lm_eval")
             if 'extra == "ifeval"' in r}
    assert extra == {"langdetect", "immutabledict", "nltk"}
    lock = {line.split("==")[0].lower().replace("_", "-") for line in (ROOT / "requirements.lock").read_text()
            .splitlines() if "==" in line}
    assert extra <= lock
    assert "lm-eval[api,ifeval]==0.4.13" in (ROOT / "pyproject.toml").read_text()
