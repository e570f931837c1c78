"""The Dash explorer of run files: ``workbench app [RUN...]`` serves it on 127.0.0.1.

Pages (one module each in :mod:`app.pages`): Runs (the runs directory), Atlas (layer × head
grid and the head-fingerprint embedding), Head (one head's scores, pattern and statistics along
positions), Intervention lab, Circuit, Compare (two runs side by side). Run files are read only
through :func:`workbench.open_run`, and only those inside the runs directory or named on the
command line (:mod:`app.catalog`).
"""

from workbench.lazy import lazy_exports

# public name -> the module that defines it (imported on first use, so that the CLI can read
# app/cli.py without importing Dash)
_EXPORTS = {"create_app": "app.server", "serve": "app.server"}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
