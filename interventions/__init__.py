"""Head-level interventions: specs as data, applied on both capture paths, and the evaluation loop.

    import workbench as wb
    from interventions import ZeroAblation, IOI
    model = wb.load("smollm2-135m")
    result = wb.evaluate(model, IOI(n=32), ZeroAblation(heads=[(9, 0)]))
    result.table          # metric with and without, diff with bootstrap CI, matched random control
    wb.intervene(model, "When Mary and John went to the store, John gave a drink to",
                 [UniformAttention(heads=[(9, 0)])])   # logits with the head's attention uniform

Modules: :mod:`~interventions.specs` (the kinds), :mod:`~interventions.ops` (their arithmetic on
each path), :mod:`~interventions.engine` (hooks and groups), :mod:`~interventions.streamed`
(the attention function of the long path), :mod:`~interventions.evaluate` (evaluate, sweep),
:mod:`~interventions.self_repair`. The tasks it measures (``IOI``, ``Needle``, ``Loss``,
``NextToken``, ``Toy``) are core material, defined in :mod:`workbench.tasks.metric` and
re-exported here; a name such as ``"ioi"`` reaches them through ``workbench.tasks.get_task``.
"""

from interventions.engine import Intervener, intervene
from interventions.evaluate import EvalResult, evaluate, matched_control, sweep, top_heads
from interventions.self_repair import direct_effects, self_repair
from interventions.specs import (
    KINDS,
    FirstTokenAttention,
    Intervention,
    MeanAblation,
    PatchOutput,
    PatchPattern,
    Redistribute,
    ResampleAblation,
    ScaleOutput,
    UniformAttention,
    ZeroAblation,
    dump_specs,
    load_specs,
    spec_from_dict,
)
from workbench.tasks import IOI, Loss, Needle, NextToken, Task, TaskBatch, Toy

__all__ = [
    "IOI",
    "KINDS",
    "EvalResult",
    "FirstTokenAttention",
    "Intervener",
    "Intervention",
    "Loss",
    "MeanAblation",
    "Needle",
    "NextToken",
    "PatchOutput",
    "PatchPattern",
    "Redistribute",
    "ResampleAblation",
    "ScaleOutput",
    "Task",
    "TaskBatch",
    "Toy",
    "UniformAttention",
    "ZeroAblation",
    "direct_effects",
    "dump_specs",
    "evaluate",
    "intervene",
    "load_specs",
    "matched_control",
    "self_repair",
    "spec_from_dict",
    "sweep",
    "top_heads",
]
