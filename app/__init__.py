"""The Dash explorer of run files: ``workbench app [RUN...]`` serves it on 127.0.0.1.

Pages (one module each in :mod:`app.pages`): Runs (the runs directory), Atlas (layer × head
grid and the head-fingerprint embedding), Head (one head's scores, pattern and statistics along
positions), Intervention lab, Circuit, Compare (two runs side by side). Run files are read only
through :func:`workbench.open_run`, and only those inside the runs directory or named on the
command line (:mod:`app.catalog`).
"""

from app.server import create_app, serve

__all__ = ["create_app", "serve"]
