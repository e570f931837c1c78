"""The Dash application: :func:`create_app` builds it, :func:`serve` runs it on 127.0.0.1.

Pages are Dash Pages, one module each under :mod:`app.pages`, registered here in menu order. The
server holds two pieces of process-wide state: the :class:`app.catalog.RunCatalog` (which run
files may be read) and the :class:`app.compute.ModelPool` (models loaded once per process).
Background callbacks run in threads of this process (:class:`app.jobs.ThreadJobManager`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs

import dash
from dash import Input, Output, State, dcc, html, no_update

from app import catalog, compute
from app.components import error_panel, href, parse_heads
from app.jobs import ThreadJobManager
from workbench.errors import WorkbenchError

# (module, path, menu title), in menu order
PAGES = (
    ("app.pages.runs", "/", "Runs"),
    ("app.pages.atlas", "/atlas", "Atlas"),
    ("app.pages.head", "/head", "Head"),
    ("app.pages.lab", "/lab", "Intervention lab"),
    ("app.pages.circuit", "/circuit", "Circuit"),
    ("app.pages.compare", "/compare", "Compare"),
)
ASSETS = Path(__file__).resolve().parent / "assets"


def create_app(
    runs_dir: str | Path = "runs",
    named: Sequence[str | Path] = (),
    *,
    device: str | None = None,
    jobs_dir: str | Path | None = None,
) -> dash.Dash:
    """Build the explorer over the run files in ``runs_dir`` plus the ``named`` files.

    Call once per process: Dash Pages and ``dash.callback`` keep their registries globally.
    """
    catalog.configure(catalog.RunCatalog(Path(runs_dir), [Path(p) for p in named]))
    compute.configure(device)
    jobs_dir = jobs_dir or tempfile.mkdtemp(prefix="workbench-app-jobs-")
    app = dash.Dash(
        __name__,
        use_pages=True,
        pages_folder="",
        assets_folder=str(ASSETS),
        background_callback_manager=ThreadJobManager(jobs_dir),
        suppress_callback_exceptions=True,
        # Plotly's bundle (4.8 MB) with the page, not with its first graph: the Head page has no
        # graph until 'show' returns, and loading the bundle then made the first pattern take
        # 3.7-4.3 s to draw after its result instead of 1.1-2.4 s (docs/explorer.md, Speed)
        eager_loading=True,
        title="Attention-head workbench",
        on_error=_show_error,
    )
    for order, (module_name, path, title) in enumerate(PAGES):
        module = importlib.import_module(module_name)
        dash.register_page(module_name, path=path, name=title, order=order, layout=module.layout)
    # scikit-learn (the clustering, imported on first use by workbench.head_atlas) takes many
    # seconds to import on a busy CPU: do it before the first atlas
    threading.Thread(target=_preload, args=("sklearn.cluster",), daemon=True).start()
    app.layout = html.Div(
        [
            html.Nav(
                [
                    html.Span("attention-head workbench", className="brand"),
                    *[
                        dcc.Link(title, href=path, id=f"nav-{path.strip('/') or 'runs'}")
                        for _, path, title in PAGES
                    ],
                    html.Div(
                        [
                            dcc.Input(
                                id="goto-head",
                                placeholder="go to head, e.g. 17.3",
                                debounce=True,
                                type="text",
                            ),
                            html.Span(id="goto-error", className="goto-error"),
                            dcc.Location(id="goto-nav", refresh="callback-nav"),
                        ],
                        className="goto",
                    ),
                ],
                className="nav",
            ),
            html.Main([html.Div(id="app-error"), dash.page_container], className="content"),
        ]
    )
    return app


def _show_error(error: Exception) -> None:
    """Any error a callback did not turn into a panel itself: shown above the page, logged with
    its traceback, and the server goes on serving."""
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    message = str(error).split("\n", 1)[0] or type(error).__name__
    dash.set_props("app-error", {"children": error_panel(message, title="Something failed")})


def _preload(module: str) -> None:
    with contextlib.suppress(ImportError):  # the page that needs it says what is missing
        importlib.import_module(module)


# Menu links keep the run that is open (``?run=``), so moving between views stays on it.
# A new page also clears the last unexpected error.
@dash.callback(
    [
        *(Output(f"nav-{path.strip('/') or 'runs'}", "href") for _, path, _ in PAGES),
        Output("app-error", "children"),
    ],
    Input("_pages_location", "pathname"),
    Input("_pages_location", "search"),
)
def _carry_run(_path: str | None, search: str | None) -> list:
    run = parse_qs((search or "").lstrip("?")).get("run", [None])[0]
    return [*(path if path == "/" else href(path, run=run) for _, path, _ in PAGES), None]


@dash.callback(
    Output("goto-nav", "href"),
    Output("goto-error", "children"),
    Input("goto-head", "value"),
    State("_pages_location", "search"),
    prevent_initial_call=True,
)
def _go_to_head(text: str | None, search: str | None):
    """The go-to box: ``17.3`` (or ``L17H3``) opens that head of the run this page shows."""
    if not (text or "").strip():
        return no_update, ""
    query = parse_qs((search or "").lstrip("?"))
    run = query.get("run", query.get("a", [None]))[0]
    if not run:
        return no_update, "open a run first"
    try:
        with catalog.current().open(run) as r:
            heads = parse_heads(text, r.model)
    except (WorkbenchError, ValueError) as e:
        return no_update, str(e)
    if len(heads) != 1:
        return no_update, "type one head, e.g. 17.3"
    ((layer, head),) = heads
    return href("/head", run=run, layer=layer, head=head), ""


def serve(
    runs_dir: str | Path = "runs",
    named: Sequence[str | Path] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    device: str | None = None,
    debug: bool = False,
) -> None:
    """Run the explorer until interrupted (Flask's threaded server), with PyTorch's intra-op
    threads set for a server (:func:`app.compute.use_server_threads`)."""
    threads = compute.use_server_threads()
    app = create_app(runs_dir, named, device=device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"workbench app: listening on {host}: anyone who can reach this address can read "
            "the runs directory's scores and run models",
            file=sys.stderr,
        )
    print(
        f"workbench app: http://{host}:{port}/ (runs from {catalog.current().runs_dir}; "
        f"{threads} PyTorch thread{'s' if threads > 1 else ''})"
    )
    app.run(host=host, port=port, debug=debug, use_reloader=False)


def run_app(args: argparse.Namespace) -> None:
    """``workbench app [RUN... | DIR]`` (:mod:`app.cli` holds its arguments)."""
    dirs = [Path(r) for r in args.runs if Path(r).is_dir()]
    files = [Path(r) for r in args.runs if not Path(r).is_dir()]
    if len(dirs) > 1 or (dirs and args.runs_dir):
        raise WorkbenchError("give one runs directory (a directory argument or --runs-dir)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WorkbenchError(f"no such run file: {', '.join(missing)}")
    runs_dir = Path(args.runs_dir or (dirs[0] if dirs else "runs"))
    if not runs_dir.is_dir() and not files:
        raise WorkbenchError(
            f"no runs directory {runs_dir}; make a run first (workbench scan MODEL --out "
            f"{runs_dir}/x.h5) or pass run files: workbench app RUN.h5"
        )
    serve(runs_dir, files, host=args.host, port=args.port, device=args.device)
