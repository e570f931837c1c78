"""Atlas: the layer × head grid coloured by any score, label or stored circuit, the head table,
and the head-fingerprint map.

The grid is one heatmap (fast at 30+ layers × 32 heads); the range slider greys out heads whose
score lies outside it, dots mark the heads the probe labelled, and lines separate KV groups
(grouped-query attention). A stored circuit colours the grid by head class. The head table lists
every head with every score, its labels and circuit class: sort and filter it in the browser
(type ``17.3`` in the head column, ``sink`` in the labels column, ``> 0.5`` in a score column),
or download it as CSV. The fingerprint map is :func:`workbench.head_atlas.build_atlas`: k-means
clusters (marker shapes, with a legend) and a PCA layout of every head's standardised score
vector, coloured by the score chosen above. Clicking a head in the grid or the map opens it on
the Head page.

A model that reads most of the scan's tokens as its unknown token (a toy model fed prose) scores
near 0 everywhere for no reason of its own; the page says so above the grid.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Input, Output, State, callback, dash_table, dcc, html, no_update

from app import catalog, compute
from app.components import error_panel, href, note, run_header
from interventions.circuit import Circuit
from workbench import figures as figs
from workbench.errors import WorkbenchError
from workbench.head_atlas import Atlas, build_atlas
from workbench.store import open_run

SCORE, LABEL, CIRCUIT = "score:", "label:", "circuit:"
PREFERRED = ("sink", "retrieval", "entropy")  # the first view, when the run has one


def _views(run) -> list[dict[str, str]]:
    return (
        [{"label": f"score · {n}", "value": SCORE + n} for n in run.score_names]
        + [{"label": f"label · {n}", "value": LABEL + n} for n in run.label_names]
        + [{"label": f"circuit · {n} (classes)", "value": CIRCUIT + n} for n in run.circuit_names]
    )


def _classes(run, name: str) -> dict[tuple[int, int], str]:
    """(layer, head) -> class of the heads of stored circuit ``name``."""
    circuit = Circuit.from_json(run.circuit(name))
    return {(h.layer, h.head): h.role for h in circuit.heads}


def layout(run: str | None = None, view: str | None = None, **_query: str) -> html.Div:
    cat = catalog.current()
    if not run:
        return _pick_run()
    try:
        with cat.open(run) as r:
            info = r.model
            views = _views(r)
    except WorkbenchError as e:
        return html.Div([html.H2("Atlas"), error_panel(str(e))], className="page")
    if not views:
        return html.Div(
            [html.H2("Atlas"), error_panel(f"run {run!r} holds no score tables")], className="page"
        )
    values = [v["value"] for v in views]
    preferred = [SCORE + name for name in PREFERRED if SCORE + name in values]
    view = view if view in values else (preferred or values)[0]
    return html.Div(
        [
            html.H2("Atlas"),
            run_header(
                run,
                info,
                ("compare with…", href("/", compare=run)),
                ("circuit", href("/circuit", run=run)),
            ),
            dcc.Store(id="atlas-run", data=run),
            dcc.Location(id="atlas-nav", refresh="callback-nav"),
            html.Div(
                [
                    html.Div(
                        [
                            html.Label("colour by", htmlFor="atlas-view"),
                            dcc.Dropdown(views, view, id="atlas-view", clearable=False),
                        ],
                        className="control",
                    ),
                    html.Div(
                        [
                            html.Label("show heads with score in", id="atlas-range-label"),
                            dcc.RangeSlider(
                                0,
                                1,
                                value=[0, 1],
                                id="atlas-range",
                                allowCross=False,
                                tooltip={"placement": "bottom", "always_visible": False},
                            ),
                        ],
                        className="control control-wide",
                    ),
                ],
                className="row controls",
            ),
            html.Div(
                [
                    note(
                        "Click a head to open it. Dots: heads the probe labelled. Lines: KV groups."
                    ),
                    dcc.Link(
                        "intervene on the heads shown",
                        id="atlas-lab",
                        href="/lab",
                        className="pill",
                    ),
                ],
                className="row between",
            ),
            dcc.Loading(html.Div(id="atlas-warning")),
            dcc.Graph(id="atlas-grid", config={"displaylogo": False}),
            html.Div(id="atlas-definition", className="definition"),
            html.H3("Heads"),
            html.Div(
                [
                    note(
                        "Sort by a column header; filter by typing in the row under it "
                        "(17.3 in head, sink in labels, > 0.5 in a score)."
                    ),
                    html.Button("download CSV", id="atlas-csv", className="button"),
                    dcc.Download(id="atlas-download"),
                ],
                className="row between",
            ),
            _head_table(run),
            html.H3("Head fingerprints"),
            dcc.Loading(html.Div(id="atlas-embedding")),
        ],
        className="page page-atlas",
    )


def _pick_run() -> html.Div:
    entries = [e for e in catalog.current().entries() if e.ok]
    links = [html.Li(dcc.Link(e.key, href=href("/atlas", run=e.key))) for e in entries] or [
        html.Li("no readable run files")
    ]
    return html.Div([html.H2("Atlas"), note("Choose a run:"), html.Ul(links)], className="page")


def head_frame(run) -> pd.DataFrame:
    """One row per head: ``head`` (``"layer.head"``), layer, index, KV head, every score, the
    labels it carries and its class in each stored circuit; the atlas's table and CSV."""
    frame = run.scores_frame().rename(columns={"head": "index"})
    frame.insert(0, "head", frame["layer"].astype(str) + "." + frame["index"].astype(str))
    names = run.label_names
    masks = {name: run.label(name).ravel() for name in names}  # [n_layers * n_heads]
    frame["labels"] = [
        ", ".join(name for name in names if masks[name][i]) for i in range(len(frame))
    ]
    for name in run.circuit_names:
        classes = _classes(run, name)
        frame[f"circuit {name}"] = [
            classes.get((int(la), int(h)), "")
            for la, h in zip(frame["layer"], frame["index"], strict=True)
        ]
    return frame


def _head_table(run_key: str) -> dash_table.DataTable | html.Div:
    try:
        with catalog.current().open(run_key) as r:
            frame = head_frame(r)
    except WorkbenchError as e:
        return error_panel(str(e))
    numeric = frame.select_dtypes("number").columns
    columns = [
        {"name": c, "id": c, "type": "numeric", "format": {"specifier": ".4~g"}}
        if c in numeric
        else {"name": c, "id": c, "type": "text"}
        for c in frame.columns
    ]
    return dash_table.DataTable(
        frame.to_dict("records"),
        columns,
        id="atlas-table",
        sort_action="native",
        filter_action="native",
        filter_options={"case": "insensitive"},
        page_size=15,
        style_table={"overflowX": "auto"},
        style_cell={"fontSize": 13, "padding": "3px 6px", "fontFamily": "inherit"},
        style_header={"fontWeight": 600, "backgroundColor": "#f8f9fa"},
    )


@callback(
    Output("atlas-download", "data"),
    Input("atlas-csv", "n_clicks"),
    State("atlas-run", "data"),
    prevent_initial_call=True,
)
def _download(_clicks: int, run: str):
    """The whole head table as CSV (every head, unfiltered)."""
    with catalog.current().open(run) as r:
        frame = head_frame(r)
    stem = Path(run).stem
    return dcc.send_data_frame(frame.to_csv, f"{stem}-heads.csv", index=False)


UNKNOWN_SHARE = 0.5  # warn when more of the scanned tokens than this are the unknown token


@callback(Output("atlas-warning", "children"), Input("atlas-run", "data"))
def _unknown_tokens(run: str):
    """A warning panel when the run's model read most scanned tokens as its unknown token."""
    try:
        with catalog.current().open(run) as r:
            info = r.model
            ids = [
                np.asarray(r.token_ids(m, i))
                for m in r.measurement_names
                for i in range(r.n_items(m))
            ]
        unk = compute.pool().get(info).tokenizer.unk_token_id
    except WorkbenchError:
        return None  # no model to ask: nothing to say
    if unk is None or not ids:
        return None
    tokens = np.concatenate(ids)
    share = float((tokens == unk).mean())
    if share <= UNKNOWN_SHARE:
        return None
    return html.Div(
        [
            html.Strong("Most of the scanned text is unknown to this model. "),
            f"{share:.0%} of the {tokens.size} scanned tokens are its unknown token: "
            f"{info.name}'s tokenizer does not know the scan's words, so the scores below "
            "describe how it reads <unk>, not what its heads do. Scan prompts in its own "
            "vocabulary (a toy model's task sequences, say).",
        ],
        className="panel warning-panel",
        role="status",
    )


@callback(
    Output("atlas-range", "min"),
    Output("atlas-range", "max"),
    Output("atlas-range", "step"),
    Output("atlas-range", "value"),
    Output("atlas-range", "marks"),
    Output("atlas-range", "disabled"),
    Input("atlas-view", "value"),
    State("atlas-run", "data"),
)
def _range_for_view(view: str, run: str):
    if not view.startswith(SCORE):  # labels and circuit classes: nothing to range over
        return 0, 1, 1, [0, 1], {0: "no", 1: "yes"}, True
    try:
        with catalog.current().open(run) as r:
            table = r.score(view.removeprefix(SCORE))
    except WorkbenchError:
        return no_update, no_update, no_update, no_update, no_update, True
    scale = figs.score_scale(table.name, table.values)
    lo, hi = scale.zmin, scale.zmax
    marks = {lo: f"{lo:.3g}", hi: f"{hi:.3g}"}
    if table.threshold is not None and lo < table.threshold < hi:
        marks[table.threshold] = f"threshold {table.threshold:.3g}"
    return lo, hi, (hi - lo) / 200, [lo, hi], marks, False


@callback(
    Output("atlas-grid", "figure"),
    Output("atlas-definition", "children"),
    Input("atlas-view", "value"),
    Input("atlas-range", "value"),
    State("atlas-run", "data"),
)
def _grid(view: str, value_range: list[float], run: str):
    try:
        with catalog.current().open(run) as r:
            info = r.model
            if view.startswith(CIRCUIT):
                name = view.removeprefix(CIRCUIT)
                return figs.class_heatmap(info, _classes(r, name), f"circuit {name}"), html.P(
                    [
                        html.Strong(f"circuit {name}: "),
                        "each head's class as circuit discovery assigned it (see the Circuit "
                        "page for the evidence).",
                    ]
                )
            if view.startswith(LABEL):
                name = view.removeprefix(LABEL)
                mask = r.label(name)
                rule = _label_rule(r, name)
                return figs.label_heatmap(info, mask, name), html.P(
                    [html.Strong(f"label {name}: "), rule]
                )
            table = r.score(view.removeprefix(SCORE))
    except WorkbenchError as e:
        return go.Figure(), error_panel(str(e))
    fig = figs.score_heatmap(
        info,
        table.values,
        table.name,
        value_range=tuple(value_range) if value_range else None,
        selected=table.selected if table.label else None,
        title=f"{table.name} per head",
    )
    return fig, _definition(table)


MAX_LAB_HEADS = 64


@callback(
    Output("atlas-lab", "href"),
    Output("atlas-lab", "children"),
    Input("atlas-view", "value"),
    Input("atlas-range", "value"),
    State("atlas-run", "data"),
)
def _lab_link(view: str, value_range: list[float] | None, run: str):
    """The lab, preloaded with the heads this view picks out: a label's heads; for a score, the
    heads inside a narrowed range, or the probe's labelled heads when the range is full."""
    try:
        with catalog.current().open(run) as r:
            if view.startswith(LABEL):
                chosen = r.label(view.removeprefix(LABEL))
            elif view.startswith(CIRCUIT):
                chosen = np.zeros((r.model.n_layers, r.model.n_heads), dtype=bool)
                for layer, head in _classes(r, view.removeprefix(CIRCUIT)):
                    chosen[layer, head] = True
            else:
                table = r.score(view.removeprefix(SCORE))
                scale = figs.score_scale(table.name, table.values)
                lo, hi = value_range or (scale.zmin, scale.zmax)
                narrowed = lo > scale.zmin or hi < scale.zmax
                chosen = (table.values >= lo) & (table.values <= hi) if narrowed else table.selected
    except WorkbenchError:
        return no_update, no_update
    heads = [(int(la), int(h)) for la, h in zip(*np.nonzero(chosen), strict=True)]
    if not heads:
        return href("/lab", run=run), "intervention lab (no heads picked out here)"
    shown = heads[:MAX_LAB_HEADS]
    more = f" (first {MAX_LAB_HEADS})" if len(heads) > MAX_LAB_HEADS else ""
    text = f"intervene on these {len(heads)} heads{more}"
    return href("/lab", run=run, heads=",".join(f"{la}.{h}" for la, h in shown)), text


def _label_rule(run, name: str) -> str:
    for score in run.score_names:
        table = run.score(score)
        if table.label == name and table.threshold is not None:
            return f"{score} > {table.threshold:g} ({table.definition})"
    return "as stored in the run file"


def _definition(table) -> html.Div:
    counts = ""
    if table.label:
        n = int(table.selected.sum())
        counts = f"; {n} of {table.values.size} heads labelled {table.label}"
    threshold = f"threshold {table.threshold:g}" if table.threshold is not None else "no threshold"
    params = ", ".join(f"{k}={v}" for k, v in table.parameters.items())
    return html.Div(
        [
            html.P([html.Strong(table.name + ": "), table.definition]),
            html.P(
                f"{threshold}{counts}" + (f"; parameters: {params}" if params else ""),
                className="muted",
            ),
        ]
    )


@functools.lru_cache(maxsize=16)
def _atlas(path: str, mtime_ns: int) -> Atlas:
    with open_run(path) as run:
        return build_atlas(run)


@callback(
    Output("atlas-embedding", "children"),
    Input("atlas-view", "value"),
    State("atlas-run", "data"),
)
def _embedding(view: str, run: str):
    cat = catalog.current()
    try:
        path = cat.resolve(run)
        atlas = _atlas(str(path), Path(path).stat().st_mtime_ns)
        with cat.open(run) as r:
            info = r.model
            name = view.removeprefix(SCORE).removeprefix(LABEL)
            if view.startswith(CIRCUIT):
                colour, scale = None, None  # classes: the map keeps its cluster colours
            elif view.startswith(SCORE):
                colour = r.score(name).values.ravel()
                scale = figs.score_scale(name, r.score(name).values)
            else:
                colour = r.label(name).ravel().astype(float)
                scale = figs.LABEL_SCALE
    except WorkbenchError as e:
        return error_panel(str(e), title="No fingerprint map")
    frame = atlas.frame
    index = frame["layer"].to_numpy() * info.n_heads + frame["head"].to_numpy()
    fig = atlas.figure(
        colour=None if colour is None else colour[index],
        colour_name=name,
        scale=scale,
        group_size=info.group_size,
    )
    summary = atlas.cluster_summary().reset_index()
    table = html.Table(
        [
            html.Thead(html.Tr([html.Th(c) for c in summary.columns])),
            html.Tbody(
                [
                    html.Tr([html.Td(_cell(v)) for v in row])
                    for row in summary.itertuples(index=False)
                ]
            ),
        ],
        className="compact",
    )
    return html.Div(
        [
            dcc.Graph(id="atlas-scatter", figure=fig, config={"displaylogo": False}),
            html.Div(table, className="scroll-x"),
        ]
    )


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


@callback(
    Output("atlas-nav", "href"),
    Input("atlas-grid", "clickData"),
    State("atlas-run", "data"),
    prevent_initial_call=True,
)
def _open_from_grid(click: dict | None, run: str):
    if not click or not click.get("points"):
        return no_update
    point = click["points"][0]
    return href("/head", run=run, layer=int(point["y"]), head=int(point["x"]))


@callback(
    Output("atlas-nav", "href", allow_duplicate=True),
    Input("atlas-scatter", "clickData"),
    State("atlas-run", "data"),
    prevent_initial_call=True,
)
def _open_from_scatter(click: dict | None, run: str):
    if not click or not click.get("points"):
        return no_update
    layer, head = click["points"][0]["customdata"]
    return href("/head", run=run, layer=int(layer), head=int(head))
