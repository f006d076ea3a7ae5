"""Which lm-evaluation-harness tasks a recipe can run: one index per process, light enough for `align validate`
(it imports lm-eval's task registry, not torch)."""

from __future__ import annotations

import functools


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
