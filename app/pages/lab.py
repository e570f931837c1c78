"""Intervention lab: pick heads, an intervention kind and a task; see the metric with and without.

The run's model (loaded once per server process) is evaluated by
:func:`interventions.evaluation.evaluate`: the task metric on the clean model, with the
interventions, and with matched random controls (the same intervention on as many random heads
of the same layers), with a paired bootstrap confidence interval of each difference. Or, as a
*sweep* (:func:`interventions.evaluation.sweep`), the intervention on every head alone, drawn as a
layer × head heatmap per metric. The page defines each metric of the chosen task and draws each
on its own axis.

The work runs as a Dash background callback in a thread of the server (:mod:`app.jobs`): a
progress bar counts scored batches, the cancel button stops the job at the next batch and the
page says so. Every finished result is stored in the run file
(:func:`workbench.store.write_intervention_result`, under ``/results``), listed below the form
after a restart too, and downloadable as JSON.

Heads come from the URL (``?heads=3.2,4.1``, e.g. from the Head or Circuit page; ``control=0``
turns the matched control off, as for a circuit's complement, which leaves no untouched heads to
draw from), typed ``layer.head`` pairs, every head of a label, or the top-k of a score.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
from dash import ALL, Input, Output, State, callback, ctx, dcc, html, no_update

from app import catalog, compute, jobs
from app.components import (
    error_panel,
    format_heads,
    href,
    job_controls,
    job_options,
    note,
    parse_heads,
    run_header,
)
from interventions.evaluation import evaluate, sweep, top_heads
from interventions.specs import spec_from_dict
from workbench import figures as figs
from workbench.errors import WorkbenchError
from workbench.models import ModelInfo
from workbench.store import intervention_results, write_intervention_result
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


EVALUATE, SWEEP = "evaluate", "sweep"
CHANGE = (
    "difference = with − without, the mean over examples of each example's change, with a "
    "paired bootstrap {pct}% confidence interval (examples resampled). Random control: the same "
    "intervention on as many random heads of the same layers, never the chosen ones "
    "({n} draws, averaged)."
)
METRICS = {  # (task family, metric) -> definition shown on the page
    ("ioi", "logit_diff"): "logit(IO) − logit(S) at the final token, averaged over prompts "
    "(Wang et al. 2022): how strongly the model prefers the indirect object to the subject.",
    ("ioi", "accuracy"): "share of prompts with logit(IO) > logit(S). A threshold per prompt: "
    "it moves only when prompts cross 0, so it can hold at 1.0 while the logit difference "
    "falls, or fall while it moves little.",
    ("toy", "accuracy"): "share of the scored positions where the model's greedy token (the "
    "argmax over the whole vocabulary) is the right answer, averaged per sequence. It compares "
    "the answer with every token, so it falls when any third token overtakes the answer.",
    ("toy", "logit_diff"): "logit(right answer) − logit(the competing answer, e.g. the subject "
    "name) at the scored positions, averaged per sequence. It compares the answer with that one "
    "competitor only, so it can stay high while accuracy drops: the ablation lets a third token "
    "win without making the competitor any likelier.",
    ("loss", "loss"): "next-token cross-entropy in nats, averaged over every position of each "
    "window of the shipped text; higher is worse.",
}


def _tasks(model_name: str) -> list[dict[str, str]]:
    tasks = [
        {"label": "next-token loss on shipped prose", "value": "loss:prose"},
        {"label": "next-token loss on shipped code", "value": "loss:code"},
        {"label": "IOI logit difference (Wang et al.)", "value": "ioi"},
    ]
    if model_name.startswith("toy-"):
        tasks.insert(0, {"label": f"{model_name}'s training task", "value": "toy"})
    return tasks


def _family(choice: str) -> str:
    return choice.split(":", 1)[0]


def layout(
    run: str | None = None,
    heads: str | None = None,
    task: str | None = None,
    control: str | None = None,
    **_q: str,
) -> html.Div:
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
    values = [t["value"] for t in tasks]
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
                            dcc.Dropdown(
                                tasks,
                                task if task in values else values[0],
                                id="lab-task",
                                clearable=False,
                            ),
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
                    dcc.RadioItems(
                        [
                            {
                                "label": " the chosen heads together, against random heads",
                                "value": EVALUATE,
                            },
                            {
                                "label": " a sweep: every head alone (layer × head heatmap)",
                                "value": SWEEP,
                            },
                        ],
                        EVALUATE,
                        id="lab-mode",
                        inline=True,
                        inputStyle={"marginLeft": "12px"},
                    ),
                    dcc.Checklist(
                        [{"label": " matched random-head control", "value": "on"}],
                        [] if control == "0" else ["on"],
                        id="lab-control",
                        inputStyle={"marginLeft": "12px"},
                    ),
                ],
                className="row controls",
            ),
            html.Details(
                [html.Summary("what the numbers mean"), html.Div(id="lab-metrics")],
                className="section",
                open=True,
                id="lab-definitions",
            ),
            job_controls("lab-go", "lab", "run"),
            html.Div(id="lab-state"),
            html.Div(id="lab-result"),
            html.H3("Stored results"),
            note("Every result is kept in the run file; it is still here after a restart."),
            html.Div(id="lab-stored"),
            dcc.Download(id="lab-download"),
        ],
        className="page page-lab",
    )


@callback(Output("lab-metrics", "children"), Input("lab-task", "value"))
def _definitions(choice: str) -> html.Div:
    """The chosen task's metrics, defined."""
    family = _family(choice)
    metrics = [(m, text) for (f, m), text in METRICS.items() if f == family]
    return html.Div(
        [
            html.Dl(
                [
                    item
                    for metric, text in metrics
                    for item in (html.Dt(html.Strong(metric)), html.Dd(text))
                ],
                className="definitions",
            ),
            note(CHANGE.format(pct=95, n=N_CONTROLS)),
            note(
                "Each metric is drawn on its own axis: a logit difference and a share do not "
                "share a scale."
            ),
        ]
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
    Output("lab-state", "children"),
    Output("lab-progress-text", "children", allow_duplicate=True),
    Output("lab-result", "children", allow_duplicate=True),
    Input("lab-cancel", "n_clicks"),
    Input("lab-go", "n_clicks"),
    prevent_initial_call=True,
)
def _state(_cancel, _go):
    """Cancelling says so (the job stops at its next batch and stores nothing); a new run
    clears the message and the previous result."""
    if ctx.triggered_id == "lab-cancel":
        return (
            html.Div(
                [
                    html.Strong("Cancelled. "),
                    "The job stopped at its next batch; nothing was computed to the end, so "
                    "nothing was stored. Press run to start again.",
                ],
                className="panel warning-panel",
                id="lab-cancelled",
                role="status",
            ),
            "cancelled",
            no_update,
        )
    return None, no_update, None


@callback(
    Output("lab-result", "children"),
    Input("lab-go", "n_clicks"),
    State("lab-run-key", "data"),
    State("lab-heads", "value"),
    State("lab-kind", "value"),
    State("lab-param", "value"),
    State("lab-task", "value"),
    State("lab-n", "value"),
    State("lab-mode", "value"),
    State("lab-control", "value"),
    # ms between the browser's polls of the job (progress, result)
    **job_options("lab-go", "lab", interval=500, prevent_initial_call=True),
)
def _evaluate(set_progress, _clicks, run, heads_text, kind, param, task_choice, n, mode, control):
    cat = catalog.current()
    try:
        with cat.open(run) as r:
            info = r.model
        heads = parse_heads(heads_text, info)
        if mode != SWEEP and not heads:
            raise ValueError("choose at least one head")
        set_progress(("0", "1", "loading the model…"))
        pool = compute.pool()
        model = pool.get(info)
        task = _chosen_task(task_choice, int(n or 16), info.name)

        def report(done: int, total: int) -> None:
            set_progress((str(done), str(total), f"{done}/{total} batches scored"))

        with pool.lock(info):
            jobs.checkpoint()
            if mode == SWEEP:
                every = info.n_layers * info.n_heads
                counted = _Counted(task, 1 + every, report)
                options = _spec(kind, [(0, 0)], param, task_choice).to_dict()
                options = {k: v for k, v in options.items() if k not in ("kind", "heads")}
                frame = sweep(model, counted, kind=kind, options=options, batch_size=8)
                data = _sweep_record(frame, info)
            else:
                use_control = "on" in (control or [])
                n_controls = N_CONTROLS if use_control else 0
                counted = _Counted(task, 2 + n_controls, report)
                spec = _spec(kind, heads, param, task_choice)
                result = evaluate(
                    model,
                    counted,
                    spec,
                    control=use_control,
                    n_controls=N_CONTROLS,
                    batch_size=8,
                )
                data = {"mode": EVALUATE, **result.to_dict()}
        data |= {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": info.name,
            "task_choice": task_choice,
            "n_examples": int(n or 16),
            "kind": kind,
        }
        name = _result_name(data, heads)
        write_intervention_result(cat.resolve(run), name, json.dumps(data), info)
    except (WorkbenchError, ValueError) as e:
        return error_panel(str(e), title="The intervention did not run")
    return _result_view(name, data, info, pool.loads)


def _sweep_record(frame: pd.DataFrame, info: ModelInfo) -> dict[str, Any]:
    """A sweep's frame (:func:`interventions.evaluation.sweep`) as JSON-ready data."""
    return {
        "mode": SWEEP,
        "task": frame.attrs["task"],
        "metrics": list(frame.attrs["baseline"]),  # the task's metrics, headline first
        "baseline": frame.attrs["baseline"],
        "shape": [info.n_layers, info.n_heads],
        "rows": json.loads(frame.to_json(orient="records")),
    }


def _result_name(data: dict[str, Any], heads: list[tuple[int, int]]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if data["mode"] == SWEEP:
        what = "every-head"
    else:
        what = format_heads(heads[:4]).replace(", ", "+") + ("+…" if len(heads) > 4 else "")
    return f"{stamp} {data['kind']} {what} on {data['task']} ({data['mode']})"


def _result_view(name: str, data: dict[str, Any], info: ModelInfo, loads: int | None) -> html.Div:
    """One stored or fresh result, drawn from its JSON form (the same view either way)."""
    body = _sweep_view(data, info) if data["mode"] == SWEEP else _evaluation_view(data)
    extra = [] if loads is None else [note(f"model loads in this server process so far: {loads}")]
    return html.Div(
        [
            html.Div(
                [html.Strong("stored as "), html.Code(name)],
                className="muted",
                id="lab-stored-as",
            ),
            *body,
            *extra,
        ]
    )


def _evaluation_view(data: dict[str, Any]) -> list:
    table = pd.DataFrame(data["table"]).T  # one row per metric
    table.index.name = "metric"
    pct = round(100 * data["confidence"])
    has_control = "control_diff" in table.columns

    def ci(row, prefix: str) -> str:
        return f"[{row[prefix + 'ci_low']:+.4f}, {row[prefix + 'ci_high']:+.4f}]"

    rows = []
    for metric, row in table.iterrows():
        cells = [
            html.Td(html.Strong(metric)),
            html.Td(f"{row['baseline']:.4f}", className="num"),
            html.Td(f"{row['intervened']:.4f}", className="num"),
            html.Td(f"{row['diff']:+.4f}", className="num"),
            html.Td(ci(row, ""), className="num"),
        ]
        if has_control:
            cells += [
                html.Td(f"{row['control']:.4f}", className="num"),
                html.Td(f"{row['control_diff']:+.4f}", className="num"),
                html.Td(ci(row, "control_"), className="num"),
            ]
        rows.append(html.Tr(cells))
    names = ["without", "with", "difference", f"{pct}% CI"]
    if has_control:
        names += ["random control", "control diff.", f"{pct}% CI"]
    header = html.Tr([html.Th("metric")] + [html.Th(h, className="num") for h in names])
    specs = [spec_from_dict(s) for s in data["interventions"]]
    controls = " | ".join(
        ", ".join(f"{la}.{h}" for s in draw for la, h in s["heads"]) for draw in data["controls"]
    )
    n_examples = len(next(iter(data["per_example"]["baseline"].values())))
    graphs = [
        dcc.Graph(
            figure=figs.effect_bars(
                table.loc[[metric]],
                confidence=data["confidence"],
                title=f"{metric} ({pct}% CI)",
            ),
            config={"displaylogo": False},
            className="metric-graph",
        )
        for metric in table.index
    ]
    return [
        html.Div(
            [
                html.Strong(f"{data['task']}: {n_examples} examples · "),
                "; ".join(s.describe() for s in specs),
            ],
            className="panel ok-panel",
            id="lab-summary",
        ),
        html.Table([html.Thead(header), html.Tbody(rows)], className="compact", id="lab-table"),
        html.Div(graphs, className="row metric-graphs", id="lab-figure"),
        note(
            f"random control heads ({len(data['controls'])} draws): {controls}"
            if has_control
            else "no random control (turned off)"
        ),
    ]


def _sweep_view(data: dict[str, Any], info: ModelInfo) -> list:
    frame = pd.DataFrame(data["rows"])
    n_layers, n_heads = data["shape"]
    shape_info = info if (info.n_layers, info.n_heads) == (n_layers, n_heads) else None
    out: list = [
        html.Div(
            [
                html.Strong(
                    f"{data['task']}: {data['kind']} on each of {len(frame)} heads alone · "
                ),
                "baseline " + ", ".join(f"{m} {v:.4f}" for m, v in data["baseline"].items()),
            ],
            className="panel ok-panel",
            id="lab-summary",
        )
    ]
    for metric in data["metrics"]:
        grid = np.full((n_layers, n_heads), np.nan)  # [n_layers, n_heads]
        grid[frame["layer"].to_numpy(), frame["head"].to_numpy()] = frame[f"{metric}_diff"]
        if shape_info is not None:
            out.append(
                dcc.Graph(
                    figure=figs.sweep_heatmap(
                        shape_info,
                        grid,
                        metric,
                        title=f"{metric}: with − without, each head alone",
                    ),
                    config={"displaylogo": False},
                    className="sweep-graph",
                )
            )
        ranked = frame.reindex(frame[f"{metric}_diff"].abs().sort_values(ascending=False).index)
        out.append(
            html.Table(
                [
                    html.Thead(
                        html.Tr(
                            [
                                html.Th("head"),
                                html.Th(f"Δ {metric}", className="num"),
                                html.Th("95% CI", className="num"),
                            ]
                        )
                    ),
                    html.Tbody(
                        [
                            html.Tr(
                                [
                                    html.Td(f"{int(row['layer'])}.{int(row['head'])}"),
                                    html.Td(f"{row[f'{metric}_diff']:+.4f}", className="num"),
                                    html.Td(
                                        f"[{row[f'{metric}_ci_low']:+.4f}, "
                                        f"{row[f'{metric}_ci_high']:+.4f}]",
                                        className="num",
                                    ),
                                ]
                            )
                            for _, row in ranked.head(8).iterrows()
                        ]
                    ),
                ],
                className="compact narrow sweep-top",
            )
        )
    return out


@callback(
    Output("lab-stored", "children"),
    Input("lab-result", "children"),
    State("lab-run-key", "data"),
)
def _stored(_result, run: str):
    """The results stored in the run file, newest first, each with show and download."""
    try:
        stored = intervention_results(catalog.current().resolve(run))
    except WorkbenchError as e:
        return error_panel(str(e))
    if not stored:
        return note("none yet")
    rows = []
    for name in sorted(stored, reverse=True):
        data = json.loads(stored[name])
        first = data["metrics"][0]
        if data["mode"] == SWEEP:
            frame = pd.DataFrame(data["rows"])
            best = frame.iloc[frame[f"{first}_diff"].abs().argmax()]
            where = f"{int(best['layer'])}.{int(best['head'])}"
            headline = f"largest Δ {first}: {best[f'{first}_diff']:+.4f} at {where}"
        else:
            row = data["table"][first]
            headline = f"Δ {first} {row['diff']:+.4f}"
            if "control_diff" in row:
                headline += f" (random heads {row['control_diff']:+.4f})"
        rows.append(
            html.Tr(
                [
                    html.Td(name),
                    html.Td(headline),
                    html.Td(
                        [
                            html.Button(
                                "show",
                                id={"type": "lab-show", "name": name},
                                className="pill",
                            ),
                            html.Button(
                                "download JSON",
                                id={"type": "lab-get", "name": name},
                                className="pill",
                            ),
                        ],
                        className="actions",
                    ),
                ]
            )
        )
    header = html.Tr([html.Th("result"), html.Th("headline"), html.Th("")])
    return html.Table(
        [html.Thead(header), html.Tbody(rows)], className="compact", id="lab-stored-table"
    )


@callback(
    Output("lab-download", "data"),
    Input({"type": "lab-get", "name": ALL}, "n_clicks"),
    State("lab-run-key", "data"),
    prevent_initial_call=True,
)
def _download(clicks, run: str):
    if not any(clicks or []):
        return no_update
    name = ctx.triggered_id["name"]
    text = intervention_results(catalog.current().resolve(run))[name]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return {"content": text, "filename": f"{safe}.json", "type": "application/json"}


@callback(
    Output("lab-result", "children", allow_duplicate=True),
    Input({"type": "lab-show", "name": ALL}, "n_clicks"),
    State("lab-run-key", "data"),
    prevent_initial_call=True,
)
def _show(clicks, run: str):
    if not any(clicks or []):
        return no_update
    name = ctx.triggered_id["name"]
    cat = catalog.current()
    with cat.open(run) as r:
        info = r.model
    data = json.loads(intervention_results(cat.resolve(run))[name])
    return _result_view(name, data, info, None)
