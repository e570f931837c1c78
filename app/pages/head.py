"""Head: one head's scores and labels with their definitions, and what it attends to.

On a prompt of the run (its stored token ids) or a typed one, the page shows the head's attention
pattern with token labels when the prompt is short (TransformerLens ``hook_pattern``), and for any
length its statistics along positions from the streamed path: first-token (sink) mass and entropy
per query, attention received per key, and the keys it attends to most. The model is the one the
run was made with, loaded once per server process (:class:`app.compute.ModelPool`).
"""

from __future__ import annotations

import numpy as np
import torch
from dash import Input, Output, State, callback, dcc, html

from app import catalog, compute, jobs
from app.components import error_panel, href, note, run_header
from workbench import figures as figs
from workbench.errors import WorkbenchError

TYPED = "typed"
MAX_TYPED_TOKENS = 4096  # keeps one request to seconds on a CPU


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def layout(
    run: str | None = None, layer: str | None = None, head: str | None = None, **_q: str
) -> html.Div:
    title = html.H2("Head")
    if not run:
        return html.Div(
            [title, note("Open a head from the Atlas (click a cell)."), dcc.Link("runs", href="/")],
            className="page",
        )
    try:
        with catalog.current().open(run) as r:
            info = r.model
            l_, h_ = _int(layer), _int(head)
            if l_ is None or h_ is None or not (0 <= l_ < info.n_layers and 0 <= h_ < info.n_heads):
                raise WorkbenchError(
                    f"no head layer={layer!r} head={head!r} in a model of {info.n_layers} layers "
                    f"× {info.n_heads} heads"
                )
            scores = _score_rows(r, l_, h_)
            labels = [name for name in r.label_names if r.label(name)[l_, h_]]
            stats = _stat_rows(r, l_, h_)
            prompts = [
                {"label": f"{m} #{i}: {_short(r.prompt_text(m, i))}", "value": f"{m}|{i}"}
                for m in r.measurement_names
                for i in range(min(r.n_items(m), 50))
            ]
    except WorkbenchError as e:
        return html.Div([title, error_panel(str(e))], className="page")
    kv = h_ // info.group_size
    neighbours = [
        (f"L{l_ + dl} H{h_ + dh}", href("/head", run=run, layer=l_ + dl, head=h_ + dh))
        for dl, dh in ((-1, 0), (1, 0), (0, -1), (0, 1))
        if 0 <= l_ + dl < info.n_layers and 0 <= h_ + dh < info.n_heads
    ]
    return html.Div(
        [
            html.H2(f"Head L{l_} H{h_}", id="head-title"),
            run_header(
                run,
                info,
                ("atlas", href("/atlas", run=run)),
                ("ablate in the lab", href("/lab", run=run, heads=f"{l_}.{h_}")),
                *neighbours,
            ),
            html.P(
                [
                    f"KV head {kv}"
                    + (
                        f" (shared with query heads {_group(info, kv)})"
                        if info.group_size > 1
                        else ""
                    ),
                    html.Span(" · labels: ", className="muted"),
                    *(
                        [html.Span(name, className="chip") for name in labels]
                        or [html.Span("none", className="muted")]
                    ),
                ],
                id="head-labels",
            ),
            dcc.Store(id="head-id", data={"run": run, "layer": l_, "head": h_}),
            html.H3("Scores"),
            html.Div(scores, className="scroll-x"),
            html.Details(
                [html.Summary("statistics stored in the run (per item, this head)"), stats],
                className="section",
            ),
            html.H3("On a prompt"),
            html.Div(
                [
                    dcc.Dropdown(
                        [*prompts, {"label": "typed text below", "value": TYPED}],
                        prompts[0]["value"] if prompts else TYPED,
                        id="head-prompt",
                        clearable=False,
                    ),
                    dcc.Textarea(
                        id="head-text",
                        placeholder="type a prompt (used when 'typed text below' is chosen)",
                        className="textarea",
                    ),
                ],
                className="prompt-picker",
            ),
            html.Div(
                [
                    html.Button("show", id="head-show", className="button"),
                    html.Button(
                        "cancel", id="head-cancel", className="button secondary", disabled=True
                    ),
                    html.Progress(id="head-progress", value="0", max="1"),
                    html.Span("", id="head-progress-text", className="muted"),
                ],
                className="progress-row",
            ),
            html.Div(id="head-views"),
        ],
        className="page page-head",
    )


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _group(info, kv: int) -> str:
    return ", ".join(str(h) for h in range(kv * info.group_size, (kv + 1) * info.group_size))


def _score_rows(run, layer: int, head: int) -> html.Table:
    rows = []
    for name in run.score_names:
        table = run.score(name)
        value = float(table.values[layer, head])
        finite = table.values[np.isfinite(table.values)]
        rank = int((finite > value).sum()) + 1 if np.isfinite(value) else None
        threshold = "—" if table.threshold is None else f"{table.threshold:g}"
        labelled = table.label if (table.label and table.selected[layer, head]) else ""
        rows.append(
            html.Tr(
                [
                    html.Td(html.Strong(name)),
                    html.Td(f"{value:.4g}", className="num"),
                    html.Td(f"{rank} / {finite.size}" if rank else "—", className="num"),
                    html.Td(threshold, className="num"),
                    html.Td(labelled),
                    html.Td(table.definition, className="definition-cell"),
                ]
            )
        )
    header = html.Tr(
        [html.Th(h) for h in ("score", "value", "rank", "threshold", "label", "definition")]
    )
    return html.Table([html.Thead(header), html.Tbody(rows)], className="compact")


def _stat_rows(run, layer: int, head: int) -> html.Table:
    info = run.model
    rows = []
    for m in run.measurement_names:
        for name in run.stat_names(m):
            values = run.stat(m, name)
            if values.ndim != 3 or values.shape[1:] != (info.n_layers, info.n_heads):
                continue
            mine = values[:, layer, head]
            mine = mine[np.isfinite(mine)]
            if mine.size == 0:
                continue
            rows.append(
                html.Tr(
                    [
                        html.Td(f"{m} / {name}"),
                        html.Td(f"{mine.mean():.4g}", className="num"),
                        html.Td(f"{mine.min():.3g} – {mine.max():.3g}", className="num"),
                        html.Td(str(mine.size), className="num"),
                    ]
                )
            )
    header = html.Tr([html.Th(h) for h in ("statistic", "mean", "range", "items")])
    return html.Table([html.Thead(header), html.Tbody(rows)], className="compact")


@callback(
    Output("head-views", "children"),
    Input("head-show", "n_clicks"),
    State("head-prompt", "value"),
    State("head-text", "value"),
    State("head-id", "data"),
    background=True,
    running=[
        (Output("head-show", "disabled"), True, False),
        (Output("head-cancel", "disabled"), False, True),
    ],
    progress=[
        Output("head-progress", "value"),
        Output("head-progress", "max"),
        Output("head-progress-text", "children"),
    ],
    cancel=[Input("head-cancel", "n_clicks")],
)
def _views(set_progress, _clicks: int | None, choice: str, typed: str | None, ident: dict):
    """Long prompts take a while on a CPU: a background job in the server, with progress per
    transformer block and a cancel button (:mod:`app.jobs`)."""
    cat = catalog.current()
    layer, head = ident["layer"], ident["head"]
    try:
        with cat.open(ident["run"]) as r:
            info = r.model
            stored = None
            if choice != TYPED:
                measurement, index = choice.split("|")
                stored = r.token_ids(measurement, int(index))
        if stored is None and not (typed or "").strip():
            return note("Type a prompt, then press show.")
        set_progress(("0", "1", "loading the model…"))
        pool = compute.pool()
        model = pool.get(info)
        ids = (
            torch.as_tensor(stored, dtype=torch.long)
            if stored is not None
            else model.tokenize(typed, MAX_TYPED_TOKENS)
        )

        def on_block(i: int, n: int) -> None:
            jobs.checkpoint()
            set_progress((str(i), str(n), f"{ids.numel()} tokens: block {i + 1} of {n}"))

        with pool.lock(info):
            positions = compute.head_positions(model, ids, layer, head, on_block)
            pattern = (
                figs.head_pattern(model, ids, layer, head)
                if ids.numel() <= compute.PATTERN_MAX_TOKENS
                else None
            )
    except WorkbenchError as e:
        return error_panel(str(e))
    set_progress(("1", "1", f"{ids.numel()} tokens: done"))
    labels = figs.token_labels(model, ids.numpy())
    views: list = [
        note(
            f"{ids.numel()} tokens · model loaded once in this server ({', '.join(pool.loaded())})"
        )
    ]
    if pattern is not None:
        views.append(
            dcc.Graph(
                id="head-pattern",
                figure=figs.pattern_heatmap(
                    pattern, labels, title=f"attention pattern of L{layer} H{head}"
                ),
                config={"displaylogo": False},
            )
        )
    else:
        views.append(
            note(
                f"{ids.numel()} tokens: longer than {compute.PATTERN_MAX_TOKENS}, so no pattern "
                "heatmap; the statistics below come from the streamed path (no L×L matrix)."
            )
        )
    views.append(
        dcc.Graph(
            id="head-positions",
            figure=figs.position_lines(
                positions.first_token_mass,
                positions.entropy,
                positions.received_rate,
                title=f"L{layer} H{head} along positions",
            ),
            config={"displaylogo": False},
        )
    )
    rows = [
        html.Tr(
            [
                html.Td(labels[p]),
                html.Td(f"{rate:.3f}", className="num"),
                html.Td(f"{total:.2f}", className="num"),
            ]
        )
        for p, rate, total in positions.top_keys(10)
    ]
    views += [
        html.H3("Most attended tokens"),
        note(
            "rate = attention the key receives divided by the number of queries that see it "
            "(Gu et al.'s sink rate for that key); sum = column sum of the pattern."
        ),
        html.Table(
            [
                html.Thead(html.Tr([html.Th("token"), html.Th("rate"), html.Th("sum")])),
                html.Tbody(rows),
            ],
            className="compact narrow",
            id="head-top-tokens",
        ),
    ]
    return html.Div(views)
