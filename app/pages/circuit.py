"""Circuit: an IOI-style circuit stored in a run, as a directed graph, its evidence, and the
lab's ablations of it.

A circuit (Wang et al. 2022: name movers, S-inhibition, induction, duplicate-token, previous-token
heads and the paths between them) is found by :mod:`interventions.circuit` and stored in the run
file under ``/circuits/<name>``; this page reads it through :meth:`workbench.Run.circuit` and
:meth:`interventions.circuit.Circuit.from_json`. The graph
(:func:`workbench.figures.circuit_graph`) puts each head at its own (head, layer) place, so the
heads of a layer never overlap, and draws each path as an arrow coloured by the path it acts
through (q, k, v, direct) and as wide as its effect. Clicking a head opens it on the Head page.
Below: the per-head evidence table, the paths, and links that ablate the circuit, or everything
but the circuit, in the Intervention lab.
"""

from __future__ import annotations

from typing import Any

from dash import Input, Output, State, callback, dcc, html, no_update

from app import catalog
from app.components import error_panel, format_heads, href, needs_panel, note, run_header
from interventions.circuit import Circuit
from workbench.errors import WorkbenchError
from workbench.models import ModelInfo


def layout(run: str | None = None, name: str | None = None, **_q: str) -> html.Div:
    title = html.H2("Circuit")
    if not run:
        links = [
            html.Li(dcc.Link(e.key, href=href("/circuit", run=e.key)))
            for e in catalog.current().entries()
            if e.ok
        ] or [html.Li("no readable run files")]
        return html.Div([title, note("Choose a run:"), html.Ul(links)], className="page")
    try:
        with catalog.current().open(run) as r:
            info = r.model
            names = r.circuit_names
            if names:
                name = name if name in names else names[0]
                circuit = Circuit.from_json(r.circuit(name))
    except WorkbenchError as e:
        return html.Div([title, error_panel(str(e))], className="page")
    header = run_header(run, info, ("atlas", href("/atlas", run=run)))
    if not names:
        return html.Div(
            [
                title,
                header,
                needs_panel(
                    "a circuit in this run",
                    "This run holds no circuit. Find one and store it here with "
                    f"`workbench ioi {info.name} --run <runs dir>/{run}`, then reload.",
                ),
            ],
            className="page",
        )
    return html.Div(
        [
            title,
            header,
            dcc.Store(id="circuit-run", data=run),
            dcc.Location(id="circuit-nav", refresh="callback-nav"),
            html.Div(
                [
                    html.Label("circuit", htmlFor="circuit-name"),
                    dcc.Dropdown(
                        [{"label": n, "value": href("/circuit", run=run, name=n)} for n in names],
                        href("/circuit", run=run, name=name),
                        id="circuit-name",
                        clearable=False,
                    ),
                ],
                className="control",
            ),
            html.P(circuit.summary().split("\n")[0], className="muted"),
            _metrics(circuit),
            _ablate_links(circuit, run, info),
            note(
                "Click a head to open it. Arrows point from sender to receiver; colour: the path "
                "(q, k, v or direct to the logits); width: the size of the path-patching effect."
            ),
            dcc.Graph(id="circuit-graph", figure=circuit.plot(), config={"displaylogo": False}),
            html.H3("Classes"),
            _classes(circuit, run),
            html.H3("Evidence per head"),
            _evidence(circuit),
            html.H3("Paths"),
            _edges(circuit),
        ],
        className="page page-circuit",
    )


def _metrics(circuit: Any) -> html.Div:
    m = circuit.metrics
    shown = [
        ("clean logit diff.", m.get("clean_logit_diff"), "{:.3f}"),
        ("ABC logit diff.", m.get("abc_logit_diff"), "{:.3f}"),
        ("accuracy", m.get("clean_accuracy"), "{:.1%}"),
        ("faithfulness F(C)/F(M)", m.get("faithfulness"), "{:.1%}"),
        ("normalised faithfulness", m.get("faithfulness_normalized"), "{:.1%}"),
        ("heads", len(circuit.heads), "{}"),
    ]
    return html.Div(
        [
            html.Div(
                [
                    html.Div(fmt.format(value), className="value"),
                    html.Div(label, className="label"),
                ],
                className="metric",
            )
            for label, value, fmt in shown
            if value is not None
        ],
        className="result-grid",
    )


def _ablate_links(circuit: Circuit, run: str, info: ModelInfo) -> html.Div:
    """The lab, preloaded: the circuit's heads zero-ablated against matched random heads, or
    every other head (its complement, no random control: no untouched heads are left to draw)."""
    heads = sorted(circuit.head_set)
    others = [
        (layer, head)
        for layer in range(info.n_layers)
        for head in range(info.n_heads)
        if (layer, head) not in circuit.head_set
    ]
    task = "ioi" if str(circuit.task.get("task", "")).startswith("ioi") else None
    return html.Div(
        [
            dcc.Link(
                f"ablate the circuit ({len(heads)} heads) in the lab",
                href=href("/lab", run=run, heads=format_heads(heads), task=task),
                className="pill",
                id="circuit-ablate",
            ),
            dcc.Link(
                f"ablate its complement ({len(others)} heads)",
                href=href("/lab", run=run, heads=format_heads(others), task=task, control="0"),
                className="pill",
                id="circuit-ablate-complement",
            ),
        ],
        className="pill-row section",
    )


def _evidence(circuit: Circuit) -> html.Div:
    """One row per circuit head: its class and every number that put it there."""
    frame = circuit.to_pandas()
    frame = frame.dropna(axis=1, how="all")  # evidence not measured for any head
    header = html.Tr([html.Th(c, className="num" if i > 2 else None) for i, c in enumerate(frame)])
    rows = [
        html.Tr([html.Td(_cell(v), className="num" if i > 2 else None) for i, v in enumerate(row)])
        for row in frame.itertuples(index=False)
    ]
    return html.Div(
        [
            note(
                "dla: direct logit attribution to logit(IO) − logit(S); act_patch: activation "
                "patching effect; end_io / end_s2: attention from END to IO / S2; s2_s1, "
                "s2_s1p1, s1p1_s1: duplicate, induction and previous-token attention; pp_*: "
                "path patching through the named receivers (docs/circuits.md)."
            ),
            html.Table(
                [html.Thead(header), html.Tbody(rows)], className="compact", id="circuit-evidence"
            ),
        ],
        className="scroll-x",
    )


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):
        return f"{value:+.3f}"
    return str(value)


def _classes(circuit: Any, run: str) -> html.Table:
    rows = [
        html.Tr(
            [
                html.Td(role),
                html.Td(str(len(heads)), className="num"),
                html.Td(
                    [
                        dcc.Link(
                            f"{la}.{h}",
                            href=href("/head", run=run, layer=la, head=h),
                            className="pill",
                        )
                        for la, h in heads
                    ]
                ),
            ]
        )
        for role, heads in circuit.by_class().items()
    ]
    header = html.Tr([html.Th("class"), html.Th("n", className="num"), html.Th("heads")])
    return html.Table([html.Thead(header), html.Tbody(rows)], className="compact",
                      id="circuit-classes")  # fmt: skip


def _edges(circuit: Any) -> html.Div:
    if not circuit.edges:
        return note("No paths stored.")
    ranked = sorted(circuit.edges, key=lambda e: -abs(e.effect or 0.0))
    rows = [
        html.Tr(
            [
                html.Td(e.sender),
                html.Td(e.receiver),
                html.Td(e.via),
                html.Td("—" if e.effect is None else f"{e.effect:+.3f}", className="num"),
            ]
        )
        for e in ranked[:20]
    ]
    header = html.Tr(
        [html.Th("sender"), html.Th("receiver"), html.Th("via"), html.Th("effect", className="num")]
    )
    more = f" (20 of {len(ranked)} shown)" if len(ranked) > 20 else ""
    return html.Div(
        [
            note("effect: path-patching change relative to the clean logit difference" + more),
            html.Table([html.Thead(header), html.Tbody(rows)], className="compact"),
        ]
    )


@callback(
    Output("circuit-nav", "href"),
    Input("circuit-graph", "clickData"),
    State("circuit-run", "data"),
    prevent_initial_call=True,
)
def _open_head(click: dict | None, run: str):
    point = (click or {}).get("points", [{}])[0]
    if not point.get("customdata"):
        return no_update  # an edge or the logits node
    layer, head = point["customdata"]
    return href("/head", run=run, layer=int(layer), head=int(head))


@callback(
    Output("circuit-nav", "href", allow_duplicate=True),
    Input("circuit-name", "value"),
    prevent_initial_call=True,
)
def _switch(target: str):
    return target
