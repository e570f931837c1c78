"""The Dash explorer of run files: ``workbench app [RUN...]`` serves it on 127.0.0.1.

Pages (one module each in :mod:`app.pages`): Runs (the runs directory), Atlas (layer × head
grid by score, label or circuit class, the sortable head table with CSV, the head-fingerprint
map), Head (a head picker; one head's scores, where it scores highest, and on a prompt of the
scan, a task, a circuit or typed text: its tokens with hover, its pattern and its layer's,
statistics along positions, what it writes), Intervention lab (evaluation against random heads
or a per-head sweep, results kept in the run file), Circuit (directed graph, evidence, ablation
links), Compare (two runs side by side). A go-to box above every page opens a head by
``layer.head``. Guide: docs/explorer.md. Run files are read only
through :func:`workbench.open_run`, and only those inside the runs directory or named on the
command line (:mod:`app.catalog`).
"""

from workbench.lazy import lazy_exports

# public name -> the module that defines it (imported on first use, so that the CLI can read
# app/cli.py without importing Dash)
_EXPORTS = {"create_app": "app.server", "serve": "app.server"}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
