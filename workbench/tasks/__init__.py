"""Prompt sets and tasks: the inputs every scan, intervention, circuit and toy model runs on.

* Prompt sets (:mod:`~workbench.tasks.prompts`): named, hashed texts to scan, ``load_prompts``.
* Tasks, every one registered by name (:mod:`~workbench.tasks.registry`) and reached through
  ``get_task(name, **options)``: the metric tasks of the evaluation loop
  (:mod:`~workbench.tasks.metric`), among them the templated tasks of circuit discovery
  (:mod:`~workbench.tasks.ioi`, :mod:`~workbench.tasks.colored_objects`), and the toy models'
  training tasks (:mod:`~workbench.tasks.toy`). Needle trials (:mod:`~workbench.tasks.needle`)
  and the shipped corpora (:mod:`~workbench.tasks.corpus`) are their material.
"""

from workbench.tasks.metric import (
    IOI,
    ColoredObjects,
    Loss,
    Needle,
    NextToken,
    Task,
    TaskBatch,
    TemplatedMetric,
    Toy,
)
from workbench.tasks.prompts import PromptSet, load_prompts, shipped_prompt_sets
from workbench.tasks.registry import get_task, task_names
from workbench.tasks.toy import ToyTask

__all__ = [
    "IOI",
    "ColoredObjects",
    "Loss",
    "Needle",
    "NextToken",
    "PromptSet",
    "Task",
    "TaskBatch",
    "TemplatedMetric",
    "Toy",
    "ToyTask",
    "get_task",
    "load_prompts",
    "shipped_prompt_sets",
    "task_names",
]
