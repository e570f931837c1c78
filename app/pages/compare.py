"""Compare: two runs side by side (two models, or one model on two inputs or domains).

Both atlases of a score share one colour scale. When the runs have the same layer × head shape
(one model twice), the page adds their difference B − A on a diverging scale and lists the heads
that changed most and the heads whose label flips. Runs of different models are lined up by
relative depth (per-layer mean against layer / last layer) and by the share of labelled heads.
"""

from __future__ import annotations

import numpy as np
from dash import Input, Output, State, callback, dcc, html

from app import catalog
from app import figures as figs
from app.components import error_panel, href, model_line, note
from app.pages.atlas import PREFERRED
from workbench.errors import WorkbenchError


def layout(
    a: str | None = None, b: str | None = None, score: str | None = None, **_q: str
) -> html.Div:
    cat = catalog.current()
    good = [e.key for e in cat.entries() if e.ok]
    picker = html.Div(
        [
            dcc.Dropdown(good, a, id="compare-a", placeholder="run A"),
            dcc.Dropdown(good, b, id="compare-b", placeholder="run B"),
            dcc.Link(
                "compare", id="compare-go", href=href("/compare", a=a, b=b), className="button"
            ),
        ],
        className="row compare-picker",
    )
    body: list = [html.H2("Compare"), picker]
    if not (a and b):
        body.append(note("Choose two runs."))
        return html.Div(body, className="page")
    try:
        with cat.open(a) as ra, cat.open(b) as rb:
            common = [n for n in ra.score_names if n in rb.score_names]
            if not common:
                raise WorkbenchError(
                    f"{a} ({', '.join(ra.score_names)}) and {b} ({', '.join(rb.score_names)}) "
                    "share no score"
                )
            info_a, info_b = ra.model, rb.model
    except WorkbenchError as e:
        body.append(error_panel(str(e)))
        return html.Div(body, className="page")
    preferred = [name for name in PREFERRED if name in common]
    score = score if score in common else (preferred or common)[0]
    body += [
        html.Div(
            [
                html.Div(
                    [
                        html.Strong("A "),
                        html.Code(a),
                        html.Div(model_line(info_a), className="muted"),
                    ]
                ),
                html.Div(
                    [
                        html.Strong("B "),
                        html.Code(b),
                        html.Div(model_line(info_b), className="muted"),
                    ]
                ),
            ],
            className="row two-col section",
        ),
        dcc.Store(id="compare-runs", data={"a": a, "b": b}),
        html.Div(
            [
                html.Label("score", htmlFor="compare-score"),
                dcc.Dropdown(common, score, id="compare-score", clearable=False),
            ],
            className="control section",
        ),
        dcc.Loading(html.Div(id="compare-views")),
    ]
    return html.Div(body, className="page page-compare")


@callback(
    Output("compare-go", "href"),
    Input("compare-a", "value"),
    Input("compare-b", "value"),
)
def _go(a: str | None, b: str | None) -> str:
    return href("/compare", a=a, b=b)


@callback(
    Output("compare-views", "children"),
    Input("compare-score", "value"),
    State("compare-runs", "data"),
)
def _views(score: str, runs: dict):
    cat = catalog.current()
    try:
        with cat.open(runs["a"]) as ra, cat.open(runs["b"]) as rb:
            ta, tb = ra.score(score), rb.score(score)
            info_a, info_b = ra.model, rb.model
    except WorkbenchError as e:
        return error_panel(str(e))
    fig = figs.compare_heatmaps(
        info_a, ta.values, info_b, tb.values, score, titles=(f"A: {runs['a']}", f"B: {runs['b']}")
    )
    views: list = [
        html.P([html.Strong(score + ": "), ta.definition], className="muted"),
        dcc.Graph(id="compare-grid", figure=fig, config={"displaylogo": False}),
    ]
    if ta.values.shape == tb.values.shape:
        views += _changes(runs, ta, tb, info_a)
    else:
        views.append(note("Different shapes: no per-head difference; compare by depth below."))
    views.append(
        dcc.Graph(
            id="compare-depth",
            figure=figs.depth_profile(
                [("A", info_a, ta.values), ("B", info_b, tb.values)],
                score,
                title=f"{score} by relative depth",
            ),
            config={"displaylogo": False},
        )
    )
    if ta.label:
        share_a, share_b = ta.selected.mean(), tb.selected.mean()
        views.append(
            html.P(
                f"heads labelled {ta.label}: A {share_a:.1%} ({int(ta.selected.sum())}), "
                f"B {share_b:.1%} ({int(tb.selected.sum())})"
            )
        )
    return html.Div(views)


def _changes(runs: dict, ta, tb, info) -> list:
    diff = tb.values - ta.values  # [n_layers, n_heads]
    order = np.argsort(-np.nan_to_num(np.abs(diff), nan=-1.0), axis=None)[:10]
    rows = []
    for flat in order:
        layer, head = divmod(int(flat), info.n_heads)
        flipped = bool(ta.label) and ta.selected[layer, head] != tb.selected[layer, head]
        rows.append(
            html.Tr(
                [
                    html.Td(
                        [
                            dcc.Link(
                                f"L{layer} H{head}",
                                href=href("/head", run=runs["a"], layer=layer, head=head),
                            ),
                            html.Span(f" · KV {head // info.group_size}", className="muted"),
                        ]
                    ),
                    html.Td(f"{ta.values[layer, head]:.3f}", className="num"),
                    html.Td(f"{tb.values[layer, head]:.3f}", className="num"),
                    html.Td(f"{diff[layer, head]:+.3g}", className="num"),
                    html.Td(
                        f"label {ta.label} flips" if flipped else "",
                        className="flag" if flipped else "",
                    ),
                ],
                className="changed" if flipped else "",
            )
        )
    flips = int((ta.selected != tb.selected).sum()) if ta.label else 0
    return [
        html.H3("Largest changes"),
        note(f"{flips} heads change label {ta.label}." if ta.label else "No label on this score."),
        html.Table(
            [
                html.Thead(
                    html.Tr(
                        [html.Th("head")]
                        + [html.Th(h, className="num") for h in ("A", "B", "B − A")]
                        + [html.Th("")]
                    )
                ),
                html.Tbody(rows),
            ],
            className="compact",
            id="compare-changes",
        ),
    ]
