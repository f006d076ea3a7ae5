"""lm-evaluation-harness: which tasks a recipe can run (one index per process, light enough for `align validate`:
it imports lm-eval's task registry, not torch), and running them on the engine that wrote eval's answers."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from alignment.config import InputError


@functools.cache
def task_manager(include: str | None, tasks: tuple[str, ...]):
    """One lm-eval task index for the stage's models. Indexing lm-eval's thousands of bundled task files takes
    about 15 s here, so when the recipe's own folder holds every task asked for, the bundled ones are skipped."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include)


def task_files(manager, name: str, seen: set[str] | None = None) -> list[Path]:
    """The YAML files lm-eval reads to build task `name` (lm_eval.tasks._factory): a task's own; each task of a
    tag; a group's own (its inline members are in it) and its named members', recursively."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    seen = set() if seen is None else seen
    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    if entry.kind == Kind.TAG:
        return [f for task in sorted(entry.tags) for f in task_files(manager, task, seen)]
    files = [Path(entry.yaml_path)] if entry.yaml_path else []
    if entry.kind == Kind.GROUP:
        members = (load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else entry.cfg or {}).get("task")
        for m in members if isinstance(members, list) else []:
            ref = m if isinstance(m, str) else m.get("group") or m.get("task") if isinstance(m, dict) else None
            files += task_files(manager, ref, seen) if isinstance(ref, str) else []
    return files


def check_task_imports(manager, tasks: list[str]) -> None:
    """Load each task's YAML files as lm-eval does when it builds the task, with their `!function`s resolved: the
    modules a task names (ifeval's utils.py, which imports langdetect and immutabledict: the `lm_eval[ifeval]`
    extra) are imported here, so a dependency this environment lacks is named before any work rather than after
    eval has served its models. The task itself is not built: that would download its dataset."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for task in tasks:
        for path in task_files(manager, task):
            try:
                load_yaml(path, resolve_func=True)
            except Exception as e:  # whatever the module raises on import is the reason the task cannot run
                cause = e
                while cause.__cause__ is not None and not isinstance(cause, ModuleNotFoundError):
                    cause = cause.__cause__  # lm-eval wraps some: "Cannot import module 'x' for function 'y'"
                what = (f"it imports the module {cause.name!r}, which is not installed" if
                        isinstance(cause, ModuleNotFoundError) and cause.name else f"raises {type(e).__name__}: {e}")
                raise InputError(f"eval.lm_eval_tasks: task {task!r} cannot be loaded: {path} {what}; install what "
                                 "it needs (lm-eval's bundled tasks declare theirs as lm-eval extras, such as "
                                 "lm-eval[ifeval]; `make` installs requirements.lock, which pins ifeval's)") from None
        if "nltk" in sys.modules:  # ifeval's checks split words and sentences with nltk's punkt_tab, which its
            # module downloads on import; where that fails (an offline node) it prints and goes on, and the
            # checks would raise LookupError after the models have been served
            try:
                sys.modules["nltk"].data.find("tokenizers/punkt_tab")
            except LookupError:
                raise InputError(f"eval.lm_eval_tasks: task {task!r} needs nltk's punkt_tab data, which lm-eval could "
                                 "not download here; run `python -m nltk.downloader punkt_tab` where there is a "
                                 "network, or set NLTK_DATA to a folder holding tokenizers/punkt_tab") from None


def task_specs(manager, tasks: list[str], pins: Path | None) -> list:
    """The tasks as simple_evaluate takes them. A task whose dataset is a Hub repo (`dataset_path: org/name`) goes
    as its full config reading the run's pinned commit of that repo (alignment/pins.py) from the Hub cache: lm-eval
    alone would read `main`, whatever it is that round, and offline nothing at all. Groups, tags, tasks built in
    Python and datasets named otherwise go by name, as lm-eval reads them."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    from alignment.hub import is_hub_id, pinned_snapshot
    from alignment.pins import commit_of

    specs = []
    for name in tasks:
        entry = manager.task_index.get(name)
        config = load_yaml(entry.yaml_path, resolve_func=True) if (
            pins and entry and entry.kind == Kind.TASK and entry.yaml_path) else {}
        dataset = config.get("dataset_path")
        if not (isinstance(dataset, str) and is_hub_id(dataset)):
            specs.append(name)
            continue
        commit = commit_of(pins, "dataset", dataset)
        print(f"lm-eval task {name}: {dataset} at commit {commit} (pinned for the run in {pins})", flush=True)
        specs.append({**config, "task": name,
                      "dataset_path": str(pinned_snapshot(dataset, commit, repo_type="dataset"))})
    return specs


def run_lm_eval(recipe, backend, path: Path, pins: Path | None = None, **kw) -> dict:
    """lm-evaluation-harness on the engine that wrote our answers, through the backend's own `lm_eval_model`
    (lm-eval's `vllm` model on the in-process engine, `local-chat-completions` on a started server, `hf` on the
    transformers model), each with the model's own chat template. `pins`: the run's pins file, whose commits the
    tasks' Hub datasets are read at (None: lm-eval reads them its own way)."""
    import lm_eval  # heavy, and needed only when a recipe asks for it

    e = recipe.eval
    include = str(e.lm_eval_include_path) if e.lm_eval_include_path else None
    manager = task_manager(include, tuple(e.lm_eval_tasks))
    return lm_eval.simple_evaluate(
        model=backend.lm_eval_model(path, e.batch_size, recipe.seed), tasks=task_specs(manager, e.lm_eval_tasks, pins),
        apply_chat_template=True, limit=e.lm_eval_limit, task_manager=manager, random_seed=recipe.seed, **kw)


def lm_eval_metrics(recipe, backend, path: Path, pins: Path | None = None) -> dict[str, float]:
    """The recipe's lm-evaluation-harness tasks on one model, as lm_eval/<task>/<metric> with an interval."""
    if not recipe.eval.lm_eval_tasks:
        return {}
    metrics = {}
    for task, res in run_lm_eval(recipe, backend, path, pins)["results"].items():
        for key, value in res.items():
            if isinstance(value, float) and "stderr" not in key:
                metrics[f"lm_eval/{task}/{key}"] = value
                stderr = res.get(key.replace(",", "_stderr,", 1))  # "acc,none" -> "acc_stderr,none"
                if isinstance(stderr, float):  # lm-eval writes "N/A" where it has none
                    metrics[f"lm_eval/{task}/{key}_ci"] = [value - 1.96 * stderr, value + 1.96 * stderr]
    return metrics
