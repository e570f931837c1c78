"""Attention-head workbench: find what each attention head does and show it causally.

The notebook surface::

    import workbench as wb
    model = wb.load("smollm2-135m")          # built-in, HF directory, .gguf file or hub name
    result = wb.scan(model, "demo", out="runs/demo.h5")
    result.scores                            # pandas DataFrame, one row per head
    run = wb.open_run("runs/demo.h5")        # lazy reader of a run file
    wb.evaluate(model, "ioi", {"kind": "zero", "heads": [[9, 0]]})  # interventions package

The names below resolve on first use (PEP 562): ``import workbench.models`` or the CLI's
``--help`` then do not pay for the whole notebook surface (torch, transformers, plotly, the
plugins). The layers and where each concept lives: docs/architecture.md.
"""

from workbench.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "Model": "workbench.models",
    "ModelInfo": "workbench.models",
    "list_models": "workbench.builtins",
    "load": "workbench.models",
    "Run": "workbench.store",
    "open_run": "workbench.store",
    "open_cache": "workbench.cache",
    "write_cache": "workbench.cache",
    "WorkbenchError": "workbench.errors",
    "ScanResult": "workbench.scanner",
    "scan": "workbench.scanner",
    "atlas": "workbench.api",
    "evaluate": "workbench.api",
    "export_map": "workbench.api",
    "intervene": "workbench.api",
    "ioi": "workbench.api",
    "plot_attention": "workbench.api",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
