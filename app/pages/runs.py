"""Runs: every run file the server may read, with its model, probes and date; open or compare.

Files that cannot be read (missing, unfinished, corrupt, foreign, other schema version) are
listed with the reason in an error panel; the rest of the page works.
"""

from __future__ import annotations

from dash import Input, Output, callback, dcc, html

from app import catalog
from app.catalog import RunEntry
from app.components import error_panel, href, note


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _row(entry: RunEntry) -> html.Tr:
    s = entry.summary
    assert s is not None
    info = s.model
    kv = f" ({info.n_kv_heads} KV)" if info.n_kv_heads != info.n_heads else ""
    inputs = ", ".join(f"{k} ({n})" for k, n in s.measurements.items())
    return html.Tr(
        [
            html.Td(html.Code(entry.key)),
            html.Td(info.name),
            html.Td(f"{info.n_layers} × {info.n_heads}{kv}"),
            html.Td(", ".join(s.scores) or "—", className="wrap"),
            html.Td(inputs or "—", className="wrap"),
            html.Td(s.created.replace("T", " ").removesuffix("+00:00")),
            html.Td(_size(entry.size), className="num"),
            html.Td(
                [
                    dcc.Link("atlas", href=href("/atlas", run=entry.key), className="pill"),
                    dcc.Link("lab", href=href("/lab", run=entry.key), className="pill"),
                    dcc.Link("circuit", href=href("/circuit", run=entry.key), className="pill"),
                ],
                className="actions",
            ),
        ]
    )


def layout(compare: str | None = None, **_query: str) -> html.Div:
    cat = catalog.current()
    entries = cat.entries()
    good = [e for e in entries if e.ok]
    bad = [e for e in entries if not e.ok]
    header = html.Tr(
        [
            html.Th(h)
            for h in ("run", "model", "layers × heads", "scores", "inputs", "created (UTC)", "size")
        ]
        + [html.Th("")]
    )
    body: list = [html.H2("Runs"), note(f"Run files in {cat.runs_dir} (rescanned on reload).")]
    if good:
        body.append(html.Table([html.Thead(header), html.Tbody([_row(e) for e in good])]))
    else:
        body.append(
            note("No readable run file yet. Make one with: workbench scan MODEL --out runs/x.h5")
        )
    for e in bad:
        body.append(error_panel(e.error or "", title=f"{e.key} cannot be read"))
    options = [{"label": e.key, "value": e.key} for e in good]
    body.append(
        html.Div(
            [
                html.H3("Compare two runs"),
                html.Div(
                    [
                        dcc.Dropdown(options, compare, id="runs-compare-a", placeholder="run A"),
                        dcc.Dropdown(options, id="runs-compare-b", placeholder="run B"),
                        dcc.Link(
                            "compare", id="runs-compare-go", href="/compare", className="button"
                        ),
                    ],
                    className="row compare-picker",
                ),
            ],
            className="section",
        )
    )
    return html.Div(body, className="page page-runs")


@callback(
    Output("runs-compare-go", "href"),
    Input("runs-compare-a", "value"),
    Input("runs-compare-b", "value"),
)
def _compare_link(a: str | None, b: str | None) -> str:
    return href("/compare", a=a, b=b)
