"""Intervention lab: pick heads, an intervention kind and a task; see the metric with and without.

The run's model (loaded once per server process) is evaluated by
:func:`interventions.evaluate`: the task metric on the clean model, with the interventions, and
with matched random controls (the same intervention on as many random heads of the same
layers), with a paired bootstrap confidence interval of each difference. The work runs as a Dash
background callback in a thread of the server (:mod:`app.jobs`): a progress bar counts scored
batches, and the cancel button stops the job at the next batch.

Heads come from the URL (``?heads=3.2,4.1``, e.g. from the Head page), typed ``layer.head``
pairs, every head of a label, or the top-k of a score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dash import Input, Output, State, callback, dcc, html, no_update

from app import catalog, compute, jobs
from app.components import error_panel, format_heads, href, note, parse_heads, run_header
from interventions.evaluation import evaluate, top_heads
from interventions.specs import spec_from_dict
from workbench.errors import WorkbenchError
from workbench.tasks import Task, get_task

KINDS = {
    "zero": "zero the head's output",
    "mean": "replace its output by its mean over the task's prompts",
    "resample": "its output on another prompt (IOI: the ABC twin; else the next prompt)",
    "scale": "scale its output by the factor",
    "uniform": "uniform attention over visible keys",
    "first_token": "all attention on the first token",
    "redistribute": "ACT: scale attention on token 0 by β, give the rest to other keys",
}
PARAMETER = {"scale": ("factor", 0.0), "redistribute": ("β", 0.4)}


def _tasks(model_name: str) -> list[dict[str, str]]:
    tasks = [
        {"label": "next-token loss on shipped prose", "value": "loss:prose"},
        {"label": "next-token loss on shipped code", "value": "loss:code"},
        {"label": "IOI logit difference (Wang et al.)", "value": "ioi"},
    ]
    if model_name.startswith("toy-"):
        tasks.insert(0, {"label": f"{model_name}'s training task", "value": "toy"})
    return tasks


def layout(run: str | None = None, heads: str | None = None, **_q: str) -> html.Div:
    title = html.H2("Intervention lab")
    if not run:
        links = [
            html.Li(dcc.Link(e.key, href=href("/lab", run=e.key)))
            for e in catalog.current().entries()
            if e.ok
        ] or [html.Li("no readable run files")]
        return html.Div(
            [title, note("Choose the run whose model to intervene on:"), html.Ul(links)],
            className="page",
        )
    try:
        with catalog.current().open(run) as r:
            info = r.model
            labels = r.label_names
            scores = r.score_names
        chosen = format_heads(parse_heads(heads, info)) if heads else ""
    except (WorkbenchError, ValueError) as e:
        return html.Div([title, error_panel(str(e))], className="page")
    tasks = _tasks(info.name)
    return html.Div(
        [
            title,
            run_header(run, info, ("atlas", href("/atlas", run=run))),
            dcc.Store(id="lab-run-key", data=run),
            html.Div(
                [
                    html.Div(
                        [
                            html.Label("heads (layer.head, comma-separated)", htmlFor="lab-heads"),
                            dcc.Input(
                                id="lab-heads",
                                value=chosen,
                                debounce=False,
                                placeholder="e.g. 3.2, 4.1",
                                className="text-input",
                            ),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("add every head of a label"),
                            dcc.Dropdown(labels, None, id="lab-add-label", placeholder="label"),
                        ],
                        className="control",
                    ),
                    html.Div(
                        [
                            html.Label("add the top heads of a score"),
                            html.Div(
                                [
                                    dcc.Dropdown(
                                        scores,
                                        None,
                                        id="lab-add-score",
                                        placeholder="score",
                                        style={"flex": "1"},
                                    ),
                                    dcc.Input(
                                        id="lab-add-k",
                                        type="number",
                                        value=3,
                                        min=1,
                                        max=info.n_layers * info.n_heads,
                                        className="number-input",
                                    ),
                                ],
                                className="inline",
                            ),
                        ],
                        className="control",
                    ),
                ],
                className="row controls",
            ),
            html.Div(
                [
                    html.Div(
                        [
                            html.Label("intervention"),
                            dcc.Dropdown(
                                [{"label": f"{k} — {v}", "value": k} for k, v in KINDS.items()],
                                "zero",
                                id="lab-kind",
                                clearable=False,
                            ),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("factor / β", id="lab-param-label"),
                            dcc.Input(
                                id="lab-param",
                                type="number",
                                value=0.0,
                                step=0.1,
                                className="number-input",
                            ),
                        ],
                        className="control control-narrow",
                    ),
                    html.Div(
                        [
                            html.Label("task"),
                            dcc.Dropdown(tasks, tasks[0]["value"], id="lab-task", clearable=False),
                        ],
                        className="control",
                    ),
                    html.Div(
                        [
                            html.Label("examples"),
                            dcc.Input(
                                id="lab-n",
                                type="number",
                                value=16,
                                min=2,
                                max=512,
                                className="number-input",
                            ),
                        ],
                        className="control control-narrow",
                    ),
                ],
                className="row controls",
            ),
            html.Div(
                [
                    html.Button("run", id="lab-go", className="button"),
                    html.Button(
                        "cancel", id="lab-cancel", className="button secondary", disabled=True
                    ),
                    html.Progress(id="lab-progress", value="0", max="1"),
                    html.Span("", id="lab-progress-text", className="muted"),
                ],
                className="progress-row",
            ),
            html.Div(id="lab-result"),
        ],
        className="page page-lab",
    )


@callback(
    Output("lab-heads", "value"),
    Input("lab-add-label", "value"),
    Input("lab-add-score", "value"),
    Input("lab-add-k", "value"),
    State("lab-heads", "value"),
    State("lab-run-key", "data"),
    prevent_initial_call=True,
)
def _add_heads(label: str | None, score: str | None, k: int | None, text: str, run: str):
    from dash import ctx

    try:
        with catalog.current().open(run) as r:
            info = r.model
            current = parse_heads(text, info)
            if ctx.triggered_id == "lab-add-label" and label:
                mask = r.label(label)  # [n_layers, n_heads]
                new = [(int(la), int(h)) for la, h in zip(*np.nonzero(mask), strict=True)]
            elif score and k:
                new = top_heads(r.score(score), int(k))
            else:
                return no_update
    except (WorkbenchError, ValueError):
        return no_update
    return format_heads(current + [h for h in new if h not in current])


@callback(
    Output("lab-param-label", "children"),
    Output("lab-param", "value"),
    Output("lab-param", "disabled"),
    Input("lab-kind", "value"),
)
def _parameter(kind: str):
    if kind in PARAMETER:
        name, default = PARAMETER[kind]
        return name, default, False
    return "factor / β (not used)", None, True


class _Counted:
    """A task that reports each scored batch: ``evaluate`` scores every batch once per group
    (clean, intervened, each control), so calls / (batches × groups) is the work done; each
    call is also where a cancelled job stops."""

    def __init__(self, task: Any, groups: int, report) -> None:
        self._task = task
        self._groups = groups
        self._report = report
        self._done = 0
        self._total = 1

    @property
    def name(self) -> str:
        return self._task.name

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._task.metrics

    def batches(self, model, batch_size: int):
        out = self._task.batches(model, batch_size)
        self._total = max(1, len(out) * self._groups)
        self._report(0, self._total)
        return out

    def score(self, logits, batch):
        jobs.checkpoint()
        result = self._task.score(logits, batch)
        self._done += 1
        self._report(self._done, self._total)
        return result


def _chosen_task(choice: str, n: int, model_name: str) -> Task:
    """The metric task behind a choice of the task menu (see ``_tasks``)."""
    if choice == "toy":
        return get_task("toy", model_name=model_name, n=n)
    if choice == "ioi":
        return get_task("ioi-toy" if model_name == "toy-ioi" else "ioi", n=n)
    corpus = choice.split(":", 1)[1]
    return get_task("loss", n=n, length=64, corpus=corpus)


def _spec(kind: str, heads: list[tuple[int, int]], param: float | None, task: str):
    data: dict[str, Any] = {"kind": kind, "heads": [list(h) for h in heads]}
    if kind == "scale":
        data["factor"] = float(param if param is not None else 0.0)
    elif kind == "redistribute":
        data |= {"sinks": [0], "beta": float(param if param is not None else 0.4)}
    elif kind == "resample":
        data["source"] = "corrupted" if task == "ioi" else "shuffled"
    return spec_from_dict(data)


N_CONTROLS = 3


@callback(
    Output("lab-result", "children"),
    Input("lab-go", "n_clicks"),
    State("lab-run-key", "data"),
    State("lab-heads", "value"),
    State("lab-kind", "value"),
    State("lab-param", "value"),
    State("lab-task", "value"),
    State("lab-n", "value"),
    background=True,
    running=[
        (Output("lab-go", "disabled"), True, False),
        (Output("lab-cancel", "disabled"), False, True),
    ],
    progress=[
        Output("lab-progress", "value"),
        Output("lab-progress", "max"),
        Output("lab-progress-text", "children"),
    ],
    cancel=[Input("lab-cancel", "n_clicks")],
    prevent_initial_call=True,
)
def _evaluate(set_progress, _clicks, run, heads_text, kind, param, task_choice, n):
    try:
        with catalog.current().open(run) as r:
            info = r.model
        heads = parse_heads(heads_text, info)
        if not heads:
            raise ValueError("choose at least one head")
        set_progress(("0", "1", "loading the model…"))
        pool = compute.pool()
        model = pool.get(info)
        spec = _spec(kind, heads, param, task_choice)
        task = _chosen_task(task_choice, int(n or 16), info.name)

        def report(done: int, total: int) -> None:
            set_progress((str(done), str(total), f"{done}/{total} batches scored"))

        counted = _Counted(task, 2 + N_CONTROLS, report)
        with pool.lock(info):
            jobs.checkpoint()
            result = evaluate(model, counted, spec, n_controls=N_CONTROLS, batch_size=8)
    except (WorkbenchError, ValueError) as e:
        return error_panel(str(e), title="The intervention did not run")
    return _result_view(result, pool.loads)


def _result_view(result, loads: int) -> html.Div:
    table = result.table  # one row per metric
    pct = round(100 * result.confidence)

    def ci(row, prefix: str) -> str:
        return f"[{row[prefix + 'ci_low']:+.4f}, {row[prefix + 'ci_high']:+.4f}]"

    rows = [
        html.Tr(
            [
                html.Td(html.Strong(metric)),
                html.Td(f"{row['baseline']:.4f}", className="num"),
                html.Td(f"{row['intervened']:.4f}", className="num"),
                html.Td(f"{row['diff']:+.4f}", className="num"),
                html.Td(ci(row, ""), className="num"),
                html.Td(f"{row['control']:.4f}", className="num"),
                html.Td(f"{row['control_diff']:+.4f}", className="num"),
                html.Td(ci(row, "control_"), className="num"),
            ]
        )
        for metric, row in table.iterrows()
    ]
    header = html.Tr(
        [html.Th("metric")]
        + [
            html.Th(h, className="num")
            for h in (
                "without",
                "with",
                "difference",
                f"{pct}% CI",
                "random control",
                "control diff.",
                f"{pct}% CI",
            )
        ]
    )
    controls = " | ".join(
        ", ".join(f"{la}.{h}" for s in draw for la, h in s.heads) for draw in result.controls
    )
    return html.Div(
        [
            html.Div(
                [
                    html.Strong(f"{result.task}: {result.n_examples} examples · "),
                    "; ".join(s.describe() for s in result.interventions),
                ],
                className="panel ok-panel",
                id="lab-summary",
            ),
            html.Table([html.Thead(header), html.Tbody(rows)], className="compact", id="lab-table"),
            dcc.Graph(figure=result.plot(), config={"displaylogo": False}, id="lab-figure"),
            note(f"random control heads ({len(result.controls)} draws): {controls}"),
            note(f"model loads in this server process so far: {loads}"),
        ]
    )
