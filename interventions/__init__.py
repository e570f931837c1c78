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
(the attention function of the long path), :mod:`~interventions.evaluation` (evaluate, sweep),
:mod:`~interventions.repair`. The tasks it measures (``IOI``, ``Needle``, ``Loss``,
``NextToken``, ``Toy``) are core material, defined in :mod:`workbench.tasks.metric` and
re-exported here; a name such as ``"ioi"`` reaches them through ``workbench.tasks.get_task``.
"""

from workbench.lazy import lazy_exports

# public name -> the module that defines it (imported on first use: workbench.lazy)
_EXPORTS = {
    "EvalResult": "interventions.evaluation",
    "FirstTokenAttention": "interventions.specs",
    "IOI": "workbench.tasks",
    "Intervener": "interventions.engine",
    "Intervention": "interventions.specs",
    "KINDS": "interventions.specs",
    "Loss": "workbench.tasks",
    "MeanAblation": "interventions.specs",
    "Needle": "workbench.tasks",
    "NextToken": "workbench.tasks",
    "PatchOutput": "interventions.specs",
    "PatchPattern": "interventions.specs",
    "Redistribute": "interventions.specs",
    "ResampleAblation": "interventions.specs",
    "ScaleOutput": "interventions.specs",
    "Task": "workbench.tasks",
    "TaskBatch": "workbench.tasks",
    "Toy": "workbench.tasks",
    "UniformAttention": "interventions.specs",
    "ZeroAblation": "interventions.specs",
    "direct_effects": "interventions.repair",
    "dump_specs": "interventions.specs",
    "evaluate": "interventions.evaluation",
    "intervene": "interventions.engine",
    "load_specs": "interventions.specs",
    "matched_control": "interventions.evaluation",
    "self_repair": "interventions.repair",
    "spec_from_dict": "interventions.specs",
    "sweep": "interventions.evaluation",
    "top_heads": "interventions.evaluation",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
