"""Head: what one head does, from the run's scores down to single tokens of one prompt.

Without a head in the URL the page is a head picker. With one it shows the head's scores and
labels with their definitions, the statistics the run stored for it (token ids decoded) and the
prompts of the run where it scores highest. On a prompt -- the scan's, a task's (IOI, needle,
a toy model's training task), a stored circuit's, or typed text -- it shows:

* a token view in the CircuitsVis style: hover a token to see where it attends (blue) and which
  queries attend to it (orange), with the weights from the exact pattern (up to
  :data:`app.compute.PATTERN_WINDOW` queries at a time) and, for queries outside that window,
  the :data:`app.compute.TOP_KEYS` keys the kernels found each query attends to most;
* the pattern of the head and of every head of its layer (small multiples; a click opens that
  head), for a query window on long prompts, so the browser never receives an L×L matrix;
* statistics along positions from the streamed path (any length);
* what the head writes: its direct logit attribution per position (its output read by the
  unembedding), the tokens it promotes and suppresses, and on IOI-style prompts its share of
  logit(answer) − logit(competitor).

All of it comes from one forward pass per prompt and layer (:func:`app.compute.layer_forward`,
cached), on the model the run was made with, loaded once per server process
(:class:`app.compute.ModelPool`).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from dash import Input, Output, State, callback, dcc, html, no_update

from app import catalog, compute, jobs
from app.components import error_panel, href, job_controls, job_options, note, run_header
from interventions.circuit import Circuit
from workbench import figures as figs
from workbench.errors import WorkbenchError
from workbench.models import Model, ModelInfo

TYPED = "typed"
MAX_TYPED_TOKENS = 4096  # keeps one request to seconds on a CPU
TASK_OPTIONS = {  # task prompts offered on the Head page: name -> options of get_task
    "ioi": {"n": 16},
    "ioi-toy": {"n": 16},
    "needle": {"length": 256, "depths": (0.5,)},
    "toy": {"n": 16},
}
TOP_EXAMPLES = 3
SCAN_SET = "scan"  # the prompt set of every distinct prompt the scan measured
MAX_RANKED_PROMPTS = 64  # prompts ranked per set: one forward pass of blocks 0..layer each
TOP_POSITIONS = 15  # rows of the ranked-positions table
CONTEXT = (8, 3)  # tokens shown before and after a ranked position
WEIGHT_FLOOR = 0.01  # token view: weights below this are not sent to the browser


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _task_sources(info: ModelInfo) -> list[tuple[str, str]]:
    """(value, label) of the tasks whose prompts suit this model."""
    if info.name == "toy-ioi":
        return [("task:ioi-toy", "task · IOI (toy-ioi's templates)"), ("task:toy", "task · toy")]
    if info.name.startswith("toy-"):
        return [("task:toy", f"task · {info.name}'s training task")]
    return [
        ("task:ioi", "task · IOI (Wang et al.)"),
        ("task:needle", "task · needle in a haystack, 256 tokens"),
    ]


def layout(
    run: str | None = None,
    layer: str | None = None,
    head: str | None = None,
    prompt: str | None = None,
    item: str | None = None,
    **_q: str,
) -> html.Div:
    title = html.H2("Head")
    if not run:
        links = [
            html.Li(dcc.Link(e.key, href=href("/head", run=e.key)))
            for e in catalog.current().entries()
            if e.ok
        ] or [html.Li("no readable run files")]
        return html.Div(
            [title, note("Choose the run whose heads to look at:"), html.Ul(links)],
            className="page",
        )
    try:
        with catalog.current().open(run) as r:
            info = r.model
            l_, h_ = _int(layer), _int(head)
            if l_ is None or h_ is None or not (0 <= l_ < info.n_layers and 0 <= h_ < info.n_heads):
                asked = None if layer is None and head is None else f"{layer}.{head}"
                return _picker(run, info, asked)
            scores = _score_rows(r, l_, h_)
            labels = [name for name in r.label_names if r.label(name)[l_, h_]]
            measurements = r.measurement_names
            circuits = r.circuit_names
    except WorkbenchError as e:
        return html.Div([title, error_panel(str(e))], className="page")
    sources = [(f"scan:{m}", f"scan prompts · {m}") for m in measurements]
    sources += _task_sources(info)
    sources += [(f"circuit:{c}", f"circuit · {c} (its task's prompts)") for c in circuits]
    sources.append((TYPED, "typed text below"))
    values = [value for value, _ in sources]
    chosen = prompt if prompt in values else values[0]
    sets = [(SCAN_SET, "the scan's prompts")] if measurements else []
    sets += [(value, label) for value, label in sources if value.startswith(("task:", "circuit:"))]
    kv = h_ // info.group_size
    neighbours = [
        (f"L{l_ + dl} H{h_ + dh}", _head_href(run, l_ + dl, h_ + dh, chosen, item))
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
                ("other heads", href("/head", run=run)),
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
            dcc.Location(id="head-nav", refresh="callback-nav"),
            html.H3("Scores"),
            html.Div(scores, className="scroll-x"),
            dcc.Loading(html.Div(id="head-stored")),
            *_ranking_controls(sets),
            html.H3("On a prompt"),
            html.Div(
                [
                    html.Div(
                        [
                            html.Label("prompts from", htmlFor="head-prompt"),
                            dcc.Dropdown(
                                [{"label": label, "value": value} for value, label in sources],
                                chosen,
                                id="head-prompt",
                                clearable=False,
                            ),
                        ],
                        className="control control-wide",
                    ),
                    html.Div(
                        [
                            html.Label("example #", htmlFor="head-item"),
                            dcc.Input(
                                id="head-item",
                                type="number",
                                min=0,
                                step=1,
                                value=_int(item) or 0,
                                className="number-input",
                            ),
                        ],
                        className="control control-narrow",
                    ),
                    html.Div(
                        [
                            html.Label("first query row (long prompts)", htmlFor="head-window"),
                            dcc.Input(
                                id="head-window",
                                type="number",
                                min=0,
                                step=1,
                                placeholder="last rows",
                                className="number-input",
                            ),
                        ],
                        className="control control-narrow",
                    ),
                ],
                className="row controls",
            ),
            dcc.Textarea(
                id="head-text",
                placeholder="type a prompt (used when 'typed text below' is chosen)",
                className="textarea",
            ),
            job_controls("head-show", "head", "show"),
            html.Div(id="head-views"),
        ],
        className="page page-head",
    )


def _head_href(run: str, layer: int, head: int, prompt: str | None, item: object) -> str:
    return href("/head", run=run, layer=layer, head=head, prompt=prompt, item=item)


def _picker(run: str, info: ModelInfo, asked: str | None) -> html.Div:
    """Choose a head: layer and head menus (or the go-to box above every page)."""
    intro = (
        f"There is no head {asked} in {info.name} ({info.n_layers} layers × {info.n_heads} "
        "heads); pick one:"
        if asked
        else "Pick a head, type one in the go-to box above (e.g. 3.2), or click one on the atlas."
    )
    return html.Div(
        [
            html.H2("Head"),
            run_header(run, info, ("atlas", href("/atlas", run=run))),
            note(intro),
            dcc.Store(id="head-pick-run", data=run),
            html.Div(
                [
                    html.Div(
                        [
                            html.Label("layer", htmlFor="head-pick-layer"),
                            dcc.Dropdown(
                                list(range(info.n_layers)), 0, id="head-pick-layer", clearable=False
                            ),
                        ],
                        className="control control-narrow",
                    ),
                    html.Div(
                        [
                            html.Label("head", htmlFor="head-pick-head"),
                            dcc.Dropdown(
                                list(range(info.n_heads)), 0, id="head-pick-head", clearable=False
                            ),
                        ],
                        className="control control-narrow",
                    ),
                    dcc.Link(
                        "open head",
                        id="head-pick-go",
                        href=href("/head", run=run, layer=0, head=0),
                        className="button",
                    ),
                ],
                className="row controls",
                id="head-picker",
            ),
        ],
        className="page page-head",
    )


@callback(
    Output("head-pick-go", "href"),
    Output("head-pick-go", "children"),
    Input("head-pick-layer", "value"),
    Input("head-pick-head", "value"),
    State("head-pick-run", "data"),
)
def _pick(layer: int, head: int, run: str):
    return href("/head", run=run, layer=layer, head=head), f"open head {layer}.{head}"


def _group(info: ModelInfo, kv: int) -> str:
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


def _is_token_id(name: str) -> bool:
    """Statistics that hold a token id per item (``hidden_sink_token``): shown decoded, never
    averaged."""
    return name.endswith("_token")


def _is_position(name: str) -> bool:
    return name.endswith("_position")


@callback(Output("head-stored", "children"), Input("head-id", "data"))
def _stored(ident: dict):
    """What the run stored for this head: per-item statistics (token ids decoded with the run's
    model; positions as their most common value) and the items where the head scores highest."""
    layer, head, run = ident["layer"], ident["head"], ident["run"]
    try:
        with catalog.current().open(run) as r:
            info = r.model
            per_stat = []  # (measurement, name, values [n_items])
            for m in r.measurement_names:
                for name in r.stat_names(m):
                    values = r.stat(m, name)
                    if values.ndim == 3 and values.shape[1:] == (info.n_layers, info.n_heads):
                        per_stat.append((m, name, values[:, layer, head]))
            texts = {m: [r.prompt_text(m, i) for i in range(r.n_items(m))] for m, _, _ in per_stat}
    except WorkbenchError as e:
        return error_panel(str(e))
    try:
        model = compute.pool().get(info)
    except WorkbenchError as e:
        model, unloaded = None, str(e)
    rows, tops = [], []
    for m, name, mine in per_stat:
        finite = mine[np.isfinite(mine)]
        if finite.size == 0:
            continue
        if _is_token_id(name) or _is_position(name):
            values, counts = np.unique(finite.astype(np.int64), return_counts=True)
            common = int(values[np.argmax(counts)])
            shown = (
                f"{figs.token_text(model, [common])[0]!r} (id {common})"
                if _is_token_id(name) and model is not None and common >= 0
                else str(common)
            )
            kind = "token" if _is_token_id(name) else "position"
            rows.append(
                html.Tr(
                    [
                        html.Td(f"{m} / {name}"),
                        html.Td(f"most common {kind}: {shown}"),
                        html.Td(f"in {counts.max()} of {finite.size} items", className="num"),
                        html.Td(str(finite.size), className="num"),
                    ]
                )
            )
            continue
        rows.append(
            html.Tr(
                [
                    html.Td(f"{m} / {name}"),
                    html.Td(f"mean {finite.mean():.4g}"),
                    html.Td(f"{finite.min():.3g} – {finite.max():.3g}", className="num"),
                    html.Td(str(finite.size), className="num"),
                ]
            )
        )
        if finite.min() == finite.max():
            continue  # the same on every item: no item stands out
        order = np.argsort(-np.nan_to_num(mine, nan=-np.inf), kind="stable")[:TOP_EXAMPLES]
        for rank, i in enumerate(order):
            if not np.isfinite(mine[i]):
                continue
            tops.append(
                html.Tr(
                    [
                        html.Td(f"{m} / {name}" if rank == 0 else ""),
                        html.Td(f"{mine[i]:.4g}", className="num"),
                        html.Td(
                            dcc.Link(
                                f"#{i}: {_short(texts[m][i])}",
                                href=_head_href(run, layer, head, f"scan:{m}", int(i)),
                            )
                        ),
                    ]
                )
            )
    header = html.Tr([html.Th(h) for h in ("statistic", "this head", "range", "items")])
    stats = html.Table([html.Thead(header), html.Tbody(rows)], className="compact")
    top_header = html.Tr([html.Th("statistic"), html.Th("value", className="num"), html.Th("item")])
    out = [
        html.H3("Where this head scores highest"),
        note(
            f"The {TOP_EXAMPLES} stored items with the highest value of each statistic for this "
            "head; open one to see its tokens below. Positions, across every prompt of a set: the "
            "next table; within the prompt shown: under its token view."
        ),
        html.Table(
            [html.Thead(top_header), html.Tbody(tops)], className="compact", id="head-top-items"
        ),
        html.Details(
            [html.Summary("all statistics stored in the run (this head, per item)"), stats],
            className="section",
            id="head-stats",
        ),
    ]
    if model is None:
        out.append(note(f"token ids are not decoded: {unloaded}"))
    return html.Div(out)


def _ranking_controls(sets: list[tuple[str, str]]) -> list:
    """The controls of the ranked-positions table: a per-position statistic, a prompt set, and
    a job button (the ranking runs the model on every prompt of the set)."""
    statistics = [
        {"label": f"{name} ({kind}: {definition})", "value": name}
        for name, (kind, definition) in compute.POSITION_STATISTICS.items()
    ]
    return [
        html.H3("Positions where it scores highest, across prompts"),
        note(
            "Every position of every prompt of a set, ranked by this head's value of a "
            "per-position statistic (the query statistics are the terms whose mean over a "
            "prompt is the run's statistic of that name); a query that sees a single key, "
            "and a key seen by a single query, are left out. Ranking runs the first layers of "
            f"the model on each prompt (at most {MAX_RANKED_PROMPTS}), once per layer."
        ),
        html.Div(
            [
                html.Div(
                    [
                        html.Label("statistic", htmlFor="head-rank-statistic"),
                        dcc.Dropdown(
                            statistics, "max_prob", id="head-rank-statistic", clearable=False
                        ),
                    ],
                    className="control control-wide",
                ),
                html.Div(
                    [
                        html.Label("over", htmlFor="head-rank-set"),
                        dcc.Dropdown(
                            [{"label": label, "value": value} for value, label in sets],
                            sets[0][0] if sets else None,
                            id="head-rank-set",
                            clearable=False,
                        ),
                    ],
                    className="control control-wide",
                ),
            ],
            className="row controls",
        ),
        job_controls("head-rank", "head-rank", "rank"),
        html.Div(id="head-ranked"),
    ]


@callback(
    Output("head-ranked", "children"),
    Input("head-rank", "n_clicks"),
    State("head-rank-statistic", "value"),
    State("head-rank-set", "value"),
    State("head-id", "data"),
    **job_options("head-rank", "head-rank", interval=250, prevent_initial_call=True),
)
def _rank(set_progress, _clicks, statistic: str, choice: str | None, ident: dict):
    """A background job: the layer's per-position statistics on every prompt of the set
    (cached per layer, so another head or statistic is instant), then the ranking."""
    started = time.perf_counter()
    layer, head = ident["layer"], ident["head"]
    try:
        if not choice:
            raise WorkbenchError("the run has no prompts to rank over")
        with catalog.current().open(ident["run"]) as r:
            info = r.model
            set_progress(("0", "1", "loading the model…"))
            pool = compute.pool()
            model = pool.get(info)
            prompts, total = _prompt_set(r, model, choice)

        def on_prompt(i: int, n: int) -> None:
            jobs.checkpoint()
            set_progress((str(i), str(n), f"prompt {i + 1} of {n}"))

        survey, cached = compute.surveys().get(model, prompts, layer, on_prompt, pool.lock(info))
        ranked = compute.top_positions(survey, head, statistic, TOP_POSITIONS)
    except WorkbenchError as e:
        set_progress(("0", "1", ""))
        return error_panel(str(e))
    took = time.perf_counter() - started
    set_progress(("1", "1", f"{len(prompts)} prompts: done in {took:.2f} s"))
    return _ranked_view(ident, model, survey, ranked, head, statistic, total, cached)


def _ranked_view(
    ident: dict,
    model: Model,
    survey: compute.Survey,
    ranked: list[compute.RankedPosition],
    head: int,
    statistic: str,
    total: int,
    cached: bool,
) -> html.Div:
    """The table of ranked positions: value, the prompt (a link that opens it below), the
    position's token in its context, and where that query attends most (or, for a key, how
    many queries see it)."""
    kind, definition = compute.POSITION_STATISTICS[statistic]
    before, after = CONTEXT
    rows = []
    for rank, found in enumerate(ranked, 1):
        prompt = survey.prompts[found.prompt]
        ids = prompt.token_ids.numpy()
        text = figs.token_text(model, ids)
        p = found.position
        stats = survey.positions[found.prompt][head]
        if kind == "query":
            attended = stats.attended(p)  # a ranked query sees 2 keys or more
            key, weight = attended[0]
            where = f"{key}:{text[key]} ({weight:.3f})"
        else:
            where = str(int(stats.seen_by[p]))
        source = prompt.source.replace(":", " ", 1)
        rows.append(
            html.Tr(
                [
                    html.Td(str(rank), className="num"),
                    html.Td(f"{found.value:.4g}", className="num"),
                    html.Td(
                        dcc.Link(
                            f"{source} #{prompt.item}",
                            href=_head_href(
                                ident["run"], survey.layer, head, prompt.source, prompt.item
                            ),
                        )
                    ),
                    html.Td(f"{p}:{text[p]}"),
                    html.Td(
                        (["…"] if p > before else [])
                        + [html.Span(t, className="ctx") for t in text[max(0, p - before) : p]]
                        + [html.Strong(text[p], className="ctx ctx-at")]
                        + [html.Span(t, className="ctx") for t in text[p + 1 : p + 1 + after]]
                        + (["…"] if p + 1 + after < len(text) else []),
                        className="context-cell",
                    ),
                    html.Td(where),
                ]
            )
        )
    shown = len(survey.prompts)
    last = "attends most to" if kind == "query" else "queries that see it"
    header = ["#", statistic, "prompt", kind, "context", last]
    return html.Div(
        [
            note(
                f"L{survey.layer} H{head}: the {len(ranked)} {kind} positions with the highest "
                f"{statistic} ({definition}) over {shown} prompts"
                + (f" (the first {shown} of {total})" if total > shown else "")
                + (" · the layer's pass over these prompts was cached" if cached else "")
                + "; open a prompt to see its tokens below."
            ),
            html.Table(
                [html.Thead(html.Tr([html.Th(h) for h in header])), html.Tbody(rows)],
                className="compact",
                id="head-ranked-table",
            ),
        ]
    )


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _resolve_prompt(
    run, model: Model, choice: str, item: int, typed: str | None
) -> tuple[torch.Tensor, str, compute.TaskPrompt | None]:
    """(token ids [seq], where they come from, the task prompt with its answer, if any)."""
    kind, _, name = choice.partition(":")
    if choice == TYPED:
        if not (typed or "").strip():
            raise WorkbenchError("type a prompt into the box, then press show")
        return model.tokenize(typed, MAX_TYPED_TOKENS), "typed text", None
    if kind == "scan":
        n = run.n_items(name)
        _check_item(item, n, f"the scan's measurement {name!r}")
        ids = torch.as_tensor(run.token_ids(name, item), dtype=torch.long)
        return ids, f"scan prompt {name} #{item}", None
    prompts, what = _source_prompts(run, model, choice)
    _check_item(item, len(prompts), what)
    shown = f"task {name} #{item}" if kind == "task" else f"circuit {name}'s prompt #{item}"
    return prompts[item].token_ids, shown, prompts[item]


def _source_prompts(run, model: Model, choice: str) -> tuple[list[compute.TaskPrompt], str]:
    """The prompts of a task (``task:NAME``) or of a stored circuit's task (``circuit:NAME``),
    and what to call the source in a message."""
    kind, _, name = choice.partition(":")
    if kind == "task":
        return compute.task_prompts(model, name, **TASK_OPTIONS.get(name, {})), f"task {name!r}"
    if kind == "circuit":
        task = Circuit.from_json(run.circuit(name)).task
        options = {"n": int(task.get("n_prompts", 16)), "seed": int(task.get("seed", 0))}
        prompts = compute.task_prompts(model, str(task.get("task", "ioi")), **options)
        return prompts, f"circuit {name!r} ({task.get('task')})"
    raise WorkbenchError(f"unknown prompt source {choice!r}")


def _prompt_set(run, model: Model, choice: str) -> tuple[list[compute.SurveyPrompt], int]:
    """The prompts a head is ranked over (at most :data:`MAX_RANKED_PROMPTS`) and how many the
    set has: ``scan`` is every distinct prompt of the scan's measurements (each found again
    under its first measurement), ``task:NAME`` and ``circuit:NAME`` as in the prompt menu."""
    if choice == SCAN_SET:
        prompts, seen = [], set()
        for measurement in run.measurement_names:
            for item in range(run.n_items(measurement)):
                ids = torch.as_tensor(run.token_ids(measurement, item), dtype=torch.long)
                key = tuple(ids.tolist())
                if key not in seen:
                    seen.add(key)
                    prompts.append(compute.SurveyPrompt(f"scan:{measurement}", item, ids))
    else:
        found, _ = _source_prompts(run, model, choice)
        prompts = [compute.SurveyPrompt(choice, i, p.token_ids) for i, p in enumerate(found)]
    if not prompts:
        raise WorkbenchError("this set has no prompts")
    return prompts[:MAX_RANKED_PROMPTS], len(prompts)


def _check_item(item: int, n: int, what: str) -> None:
    if not 0 <= item < n:
        raise WorkbenchError(f"{what} has {n} prompts: choose an example number 0 to {n - 1}")


@callback(
    Output("head-views", "children"),
    Input("head-show", "n_clicks"),
    State("head-prompt", "value"),
    State("head-item", "value"),
    State("head-window", "value"),
    State("head-text", "value"),
    State("head-id", "data"),
    # ms between the browser's polls of the job: a cached prompt shows at once
    **job_options("head-show", "head", interval=250),
)
def _views(set_progress, _clicks, choice: str, item, window, typed: str | None, ident: dict):
    """A background job in the server (long prompts take a while on a CPU), with progress per
    transformer block and a cancel button (:mod:`app.jobs`)."""
    started = time.perf_counter()
    layer, head = ident["layer"], ident["head"]
    try:
        with catalog.current().open(ident["run"]) as r:
            info = r.model
            set_progress(("0", "1", "loading the model…"))
            pool = compute.pool()
            model = pool.get(info)
            ids, source, answer = _resolve_prompt(r, model, choice, int(item or 0), typed)

        def on_block(i: int, n: int) -> None:
            jobs.checkpoint()
            set_progress((str(i), str(n), f"{ids.numel()} tokens: block {i + 1} of {n}"))

        with pool.lock(info):
            forward, cached = compute.forwards().get(
                model, ids, layer, None if window is None else int(window), on_block
            )
    except WorkbenchError as e:
        set_progress(("0", "1", ""))
        return error_panel(str(e))
    took = time.perf_counter() - started
    set_progress(("1", "1", f"{ids.numel()} tokens: done in {took:.2f} s"))
    return _render(ident, choice, item, model, forward, head, source, answer, cached, took)


def _render(
    ident: dict,
    choice: str,
    item,
    model: Model,
    forward: compute.LayerForward,
    head: int,
    source: str,
    answer: compute.TaskPrompt | None,
    cached: bool,
    took: float,
) -> html.Div:
    layer = forward.layer
    ids = forward.token_ids
    n = len(ids)
    text = figs.token_text(model, ids)
    labels = figs.token_labels(model, ids)
    start, stop = forward.window
    positions = forward.positions[head]
    reuse = "reused the cached forward pass" if cached else "one forward pass of each path"
    views: list = [
        html.P(
            f"{source} · {n} tokens · {reuse} · {took:.2f} s · model loaded once in this server "
            f"({', '.join(compute.pool().loaded())})",
            className="note",
            id="head-prompt-summary",
        ),
        html.H3("Tokens"),
        note(
            "Hover a token: blue = where it attends (this head), orange = the queries that attend "
            "to it; the line below gives the numbers."
            + (
                ""
                if (start, stop) == (0, n) and forward.pattern is not None
                else f" Exact weights for queries {start}–{stop - 1}; elsewhere the "
                f"{compute.TOP_KEYS} keys the kernels found each query attends to most "
                "(kernels.top_keys)."
            )
        ),
        _token_view(forward, head, text),
    ]
    if forward.pattern is not None:
        views += _pattern_views(ident, choice, item, forward, head, labels)
    else:
        views.append(
            note(
                f"{n} tokens: too long for the pattern path, so no pattern and no direct logit "
                "attribution; the statistics below come from the streamed path."
            )
        )
    views.append(
        dcc.Graph(
            id="head-positions",
            figure=figs.position_lines(
                positions.first_token_mass,
                positions.entropy,
                positions.received_rate,
                title=f"L{layer} H{head} along positions (streamed path, any length)",
            ),
            config={"displaylogo": False},
        )
    )
    views += _position_tables(positions, labels)
    if forward.writes is not None:
        views += _writes_views(forward, head, model, text, labels, answer)
    return html.Div(views)


def _token_view(forward: compute.LayerForward, head: int, text: list[str]) -> html.Div:
    """Tokens as spans whose ``data-i`` is their position; the weights per query travel in the
    container's ``data-weights`` (JSON: per query, ``[[key, weight], ...]``; ``exact`` the
    query rows with exact weights; the other rows hold the kernels' top keys), read by
    ``assets/tokens.js`` on hover."""
    positions = forward.positions[head]
    start, stop = forward.window
    rows: list[list[list[float]]] = []
    for q in range(len(text)):
        if forward.pattern is not None and start <= q < stop:
            row = forward.pattern[head, q - start]  # [k_pos]
            keys = np.nonzero(row >= WEIGHT_FLOOR)[0]
            rows.append([[int(k), round(float(row[k]), 3)] for k in keys])
        else:
            rows.append([[key, round(weight, 3)] for key, weight in positions.attended(q)])
    exact = [start, stop] if forward.pattern is not None else [0, 0]
    payload = json.dumps({"rows": rows, "exact": exact, "tokens": text})
    return html.Div(
        [
            html.Div(
                [
                    html.Span(piece, className="tok", **{"data-i": str(i)})
                    for i, piece in enumerate(text)
                ],
                className="token-view",
                id="head-tokens",
                **{"data-weights": payload},
            ),
            html.Div("hover a token", className="token-info muted", id="head-token-info"),
        ],
        id="head-token-view",
    )


def _pattern_views(
    ident: dict, choice: str, item, forward: compute.LayerForward, head: int, labels: list[str]
) -> list:
    layer, (start, stop), n = forward.layer, forward.window, len(forward.token_ids)
    out: list = []
    if (start, stop) == (0, n):
        out.append(
            dcc.Graph(
                id="head-pattern",
                figure=figs.pattern_heatmap(
                    forward.pattern[head], labels, title=f"attention pattern of L{layer} H{head}"
                ),
                config={"displaylogo": False},
            )
        )
    out += [
        html.H3(f"Every head of layer {layer} on this prompt"),
        dcc.Store(
            id="head-grid-target",
            data={**ident, "prompt": choice, "item": item},
        ),
        dcc.Graph(
            id="head-layer-grid",
            figure=figs.layer_patterns(
                forward.pattern, labels, layer=layer, chosen=head, window_start=start
            ),
            config={"displaylogo": False},
        ),
    ]
    return out


@callback(
    Output("head-nav", "href"),
    Input("head-layer-grid", "clickData"),
    State("head-grid-target", "data"),
    prevent_initial_call=True,
)
def _open_from_grid(click: dict | None, target: dict):
    """A click on a panel of the layer's grid opens that head on the same prompt."""
    if not click or not click.get("points"):
        return no_update
    head = int(click["points"][0]["curveNumber"])
    return _head_href(
        target["run"], target["layer"], head, target.get("prompt"), target.get("item")
    )


def _position_tables(positions: compute.PositionStats, labels: list[str]) -> list:
    keys = [
        html.Tr(
            [
                html.Td(labels[p]),
                html.Td(f"{rate:.3f}", className="num"),
                html.Td(f"{total:.2f}", className="num"),
            ]
        )
        for p, rate, total in positions.top_keys(10)
    ]
    queries = [
        html.Tr(
            [html.Td(labels[q])]
            + [
                html.Td([labels[k], html.Span(f" {weight:.3f}", className="muted")])
                for k, weight in attended
            ]
            + [html.Td("") for _ in range(compute.TOP_KEYS - len(attended))]
        )
        for q, attended in positions.top_queries(10)
    ]
    return [
        html.Div(
            [
                html.Div(
                    [
                        html.H3("Most attended tokens"),
                        note(
                            "rate = attention the key receives divided by the number of queries "
                            "that see it (Gu et al.'s sink rate for that key); sum = column sum."
                        ),
                        html.Table(
                            [
                                html.Thead(
                                    html.Tr([html.Th("key"), html.Th("rate"), html.Th("sum")])
                                ),
                                html.Tbody(keys),
                            ],
                            className="compact",
                            id="head-top-tokens",
                        ),
                    ]
                ),
                html.Div(
                    [
                        html.H3("Most focused queries"),
                        note(
                            "the queries whose largest weight is highest, and the "
                            f"{compute.TOP_KEYS} keys each attends to most with their weights "
                            "(kernels.top_keys)"
                        ),
                        html.Table(
                            [
                                html.Thead(
                                    html.Tr(
                                        [html.Th("query")]
                                        + [
                                            html.Th(f"key {rank + 1}")
                                            for rank in range(compute.TOP_KEYS)
                                        ]
                                    )
                                ),
                                html.Tbody(queries),
                            ],
                            className="compact",
                            id="head-top-queries",
                        ),
                    ]
                ),
            ],
            className="row two-col",
        )
    ]


def _writes_views(
    forward: compute.LayerForward,
    head: int,
    model: Model,
    text: list[str],
    labels: list[str],
    answer: compute.TaskPrompt | None,
) -> list:
    """What the head writes: its direct logit attribution along the prompt and the tokens it
    promotes and suppresses at the last position."""
    attribution = compute.logit_attribution(forward, head)  # [seq, vocab]
    ids = forward.token_ids
    n = len(ids)
    following = np.full(n, np.nan)
    following[:-1] = attribution[np.arange(n - 1), ids[1:]]  # logit of the actual next token
    answer_id = None if answer is None else answer.target
    if answer_id is not None:  # the last position's next token is the task's answer
        following[-1] = attribution[-1, answer_id]
    top = np.argpartition(-attribution, 3, axis=1)[:, :3]  # [seq, 3], the 3 largest
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(attribution, top, 1), 1), 1)
    hover = []
    for p in range(n):
        promoted = ", ".join(
            f"{t!r} {attribution[p, i]:+.2f}"
            for t, i in zip(figs.token_text(model, top[p]), top[p], strict=True)
        )
        if p < n - 1:
            nxt = f"next {text[p + 1]!r}: {following[p]:+.3f}"
        elif answer_id is not None:
            nxt = f"the answer {figs.token_text(model, [answer_id])[0]!r}: {following[p]:+.3f}"
        else:
            nxt = "last position"
        hover.append(f"{labels[p]} · {nxt}<br>promotes {promoted}")
    last = attribution[-1]  # [vocab]
    up, down = np.argsort(-last)[:8], np.argsort(last)[:8]
    rows = [
        html.Tr(
            [
                html.Td(repr(u_text)),
                html.Td(f"{last[u]:+.3f}", className="num"),
                html.Td(repr(d_text)),
                html.Td(f"{last[d]:+.3f}", className="num"),
            ]
        )
        for u, u_text, d, d_text in zip(
            up, figs.token_text(model, up), down, figs.token_text(model, down), strict=True
        )
    ]
    out: list = [
        html.H3("What this head writes"),
        note(
            "Direct logit attribution: the head's output z·W_O at each position, read through the "
            "final norm at the prompt's own (frozen) scale and the unembedding, as in "
            "TransformerLens's logit attribution. A bar is what the head adds to the logit of the "
            "token that follows (at the last position of a task's prompt: of its answer); hover "
            "for the tokens it promotes most there."
        ),
    ]
    if answer is not None and answer.target is not None and answer.foil is not None:
        target, foil = figs.token_text(model, [answer.target, answer.foil])
        share = last[answer.target] - last[answer.foil]
        out.append(
            html.P(
                [
                    "At the last token this head adds ",
                    html.Strong(f"{share:+.3f}"),
                    f" to logit({target!r}) − logit({foil!r}), the task's answer minus its "
                    "competitor.",
                ],
                id="head-answer-dla",
            )
        )
    out += [
        dcc.Graph(
            id="head-dla",
            figure=figs.logit_attribution_bars(
                following,
                labels,
                hover,
                title=f"L{forward.layer} H{head}: direct logit attribution",
            ),
            config={"displaylogo": False},
        ),
        html.P(f"At the last position ({labels[-1]}) it promotes and suppresses:"),
        html.Table(
            [
                html.Thead(
                    html.Tr(
                        [
                            html.Th("promotes"),
                            html.Th("logit"),
                            html.Th("suppresses"),
                            html.Th("logit"),
                        ]
                    )
                ),
                html.Tbody(rows),
            ],
            className="compact narrow",
            id="head-writes",
        ),
    ]
    return out
