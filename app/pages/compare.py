"""Compare: two runs side by side (two models, or one model on two inputs or domains).

Both atlases of one quantity (one score, or one quantity on two domains such as
``sink_mass_prose`` and ``sink_mass_code``) share one colour map and scale. When the runs have
the same layer × head shape (one model twice), the page adds their difference B − A on a
diverging scale anchored to the values' range (so noise stays pale) and lists the heads that
changed most, and, when both sides show the same score, the heads whose label flips. Runs of
different models are lined up by relative depth (per-layer mean against layer / last layer) and
by the share of labelled heads.
"""

from __future__ import annotations

import numpy as np
from dash import Input, Output, State, callback, dcc, html

from app import catalog
from app.components import error_panel, href, model_line, note
from app.pages.atlas import PREFERRED
from workbench import figures as figs
from workbench.errors import WorkbenchError


def layout(
    a: str | None = None,
    b: str | None = None,
    score: str | None = None,
    score_b: str | None = None,
    **_q: str,
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
        body.append(note("Choose two runs, or one run twice to compare two of its scores."))
        return html.Div(body, className="page")
    try:
        with cat.open(a) as ra, cat.open(b) as rb:
            names_a, names_b = ra.score_names, rb.score_names
            info_a, info_b = ra.model, rb.model
        if not names_a or not names_b:
            raise WorkbenchError(f"{a if not names_a else b} holds no score tables")
    except WorkbenchError as e:
        body.append(error_panel(str(e)))
        return html.Div(body, className="page")
    common = [n for n in names_a if n in names_b]
    preferred = [n for n in PREFERRED if n in common] or common
    score = score if score in names_a else (preferred or names_a)[0]
    score_b = score_b if score_b in names_b else (score if score in names_b else names_b[0])
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
                html.Div(
                    [
                        html.Label("score in A", htmlFor="compare-score"),
                        dcc.Dropdown(names_a, score, id="compare-score", clearable=False),
                    ],
                    className="control",
                ),
                html.Div(
                    [
                        html.Label("score in B (another domain's table, say)"),
                        dcc.Dropdown(names_b, score_b, id="compare-score-b", clearable=False),
                    ],
                    className="control",
                ),
            ],
            className="row two-col section",
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
    Input("compare-score-b", "value"),
    State("compare-runs", "data"),
)
def _views(score_a: str, score_b: str, runs: dict):
    cat = catalog.current()
    try:
        with cat.open(runs["a"]) as ra, cat.open(runs["b"]) as rb:
            ta, tb = ra.score(score_a), rb.score(score_b)
            info_a, info_b = ra.model, rb.model
    except WorkbenchError as e:
        return error_panel(str(e))
    fig = figs.compare_heatmaps(
        info_a,
        ta.values,
        info_b,
        tb.values,
        (score_a, score_b),
        titles=(f"A: {runs['a']} · {score_a}", f"B: {runs['b']} · {score_b}"),
    )
    definitions = [html.P([html.Strong(score_a + ": "), ta.definition], className="muted")]
    if score_b != score_a:
        definitions.append(html.P([html.Strong(score_b + ": "), tb.definition], className="muted"))
    views: list = [
        *definitions,
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
                [(f"A · {score_a}", info_a, ta.values), (f"B · {score_b}", info_b, tb.values)],
                score_a if score_a == score_b else "",
                title="by relative depth",
            ),
            config={"displaylogo": False},
        )
    )
    if ta.label or tb.label:
        views.append(
            html.P(
                f"heads labelled: A {ta.label or '—'} {ta.selected.mean():.1%} "
                f"({int(ta.selected.sum())}), B {tb.label or '—'} {tb.selected.mean():.1%} "
                f"({int(tb.selected.sum())})"
            )
        )
    return html.Div(views)


def _changes(runs: dict, ta, tb, info) -> list:
    # a label flips only between two tables of the same score: heads labelled "sink" in A and
    # "retrieval" in B are not one label changing its mind
    labelled = bool(ta.label and tb.label and ta.name == tb.name and ta.label == tb.label)
    diff = tb.values - ta.values  # [n_layers, n_heads]
    order = np.argsort(-np.nan_to_num(np.abs(diff), nan=-1.0), axis=None)[:10]
    rows = []
    for flat in order:
        layer, head = divmod(int(flat), info.n_heads)
        flipped = labelled and ta.selected[layer, head] != tb.selected[layer, head]
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
    flips = int((ta.selected != tb.selected).sum()) if labelled else 0
    return [
        html.H3("Largest changes"),
        note(
            f"{flips} heads change label {ta.label}."
            if labelled
            else "Label flips are counted only when both sides show the same score with a label."
        ),
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
