"""The explorer's ``workbench app`` command (handler :func:`app.server.run_app`, imported with
Dash when the command runs)."""

from __future__ import annotations

import argparse

from workbench.arguments import Command, device, integer


def _app_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", nargs="*", metavar="RUN", help="run files to show, or the runs directory"
    )
    p.add_argument("--runs-dir", help="directory whose run files are listed (default runs/)")
    p.add_argument("--port", type=integer(1, 65535), default=8050, help="port (default 8050)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--device", type=device, help="device for model views (default: cuda when available)"
    )


COMMANDS = [
    Command(
        "app",
        "serve the Dash explorer of run files on 127.0.0.1",
        "app.server:run_app",
        _app_arguments,
    ),
]
