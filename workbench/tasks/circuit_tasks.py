"""Templated tasks that circuit discovery (``interventions.ioi.find_circuit``) runs on, by name.

Every task here builds a :class:`~workbench.tasks.templated.TaskDataset` with the four roles the
circuit rules read (``IO``, ``S1``, ``S2``, ``END``, plus ``S1+1``) and a corrupted twin:

- ``ioi``: indirect object identification with the paper's templates (Wang et al. 2022);
- ``ioi-toy``: the same in the closed vocabulary of the ``toy-ioi`` reference model;
- ``colored-objects``: a Colored-Objects-style task (Merullo et al. 2023), see
  :mod:`workbench.tasks.colored_objects`.
"""

from __future__ import annotations

from typing import Any

from workbench.errors import TaskBuildError
from workbench.tasks.colored_objects import ColoredObjectsTask
from workbench.tasks.ioi import paper_task, toy_task

TASKS = {
    "ioi": paper_task,
    "ioi-toy": toy_task,
    "colored-objects": ColoredObjectsTask,
}


def templated_task(task: Any, model: Any = None) -> Any:
    """A task object from a name, an object (returned as is) or None (IOI in the model's own
    vocabulary: ``ioi-toy`` for a ``toy-ioi`` model, ``ioi`` otherwise)."""
    if task is None:
        name = getattr(getattr(model, "info", None), "name", "")
        task = "ioi-toy" if str(name).startswith("toy-ioi") else "ioi"
    if isinstance(task, str):
        if task not in TASKS:
            raise TaskBuildError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
        return TASKS[task]()
    return task
