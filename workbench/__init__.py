"""Attention-head workbench: find what each attention head does and show it causally.

The notebook surface::

    import workbench as wb
    model = wb.load("smollm2-135m")          # built-in, HF directory, .gguf file or hub name
    result = wb.scan(model, "demo", out="runs/demo.h5")
    result.scores                            # pandas DataFrame, one row per head
    run = wb.open_run("runs/demo.h5")        # lazy reader of a run file
"""

from workbench.cache import open_cache, write_cache
from workbench.errors import WorkbenchError
from workbench.models import Model, ModelInfo, list_models, load
from workbench.scanner import ScanResult, scan
from workbench.store import Run, open_run

__all__ = [
    "Model",
    "ModelInfo",
    "Run",
    "ScanResult",
    "WorkbenchError",
    "list_models",
    "load",
    "open_cache",
    "open_run",
    "scan",
    "write_cache",
]
