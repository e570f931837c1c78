"""Attention-head workbench: find what each attention head does and show it causally.

The notebook surface::

    import workbench as wb
    model = wb.load("smollm2-135m")          # built-in, HF directory, .gguf file or hub name
    result = wb.scan(model, "demo", out="runs/demo.h5")
    result.scores                            # pandas DataFrame, one row per head
    run = wb.open_run("runs/demo.h5")        # lazy reader of a run file
    wb.evaluate(model, "ioi", {"kind": "zero", "heads": [[9, 0]]})  # interventions package
"""

from workbench.api import atlas, export_map, ioi
from workbench.cache import open_cache, write_cache
from workbench.errors import WorkbenchError
from workbench.models import Model, ModelInfo, list_models, load
from workbench.plots import plot_attention
from workbench.scanner import ScanResult, scan
from workbench.store import Run, open_run

__all__ = [
    "Model",
    "ModelInfo",
    "Run",
    "ScanResult",
    "WorkbenchError",
    "atlas",
    "export_map",
    "ioi",
    "list_models",
    "load",
    "open_cache",
    "open_run",
    "plot_attention",
    "scan",
    "write_cache",
]

_INTERVENTIONS = ("evaluate", "intervene")  # imported on first use: the spine does not need them


def __getattr__(name: str):
    """``wb.evaluate`` and ``wb.intervene`` from :mod:`interventions`, loaded lazily."""
    if name in _INTERVENTIONS:
        import interventions

        return getattr(interventions, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
