"""Small building blocks shared by the pages: panels, the run header, links, head parsing, and
the controls of a background job."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from dash import Input, Output, dcc, html

from workbench.models import ModelInfo

_HEAD = re.compile(r"^\s*L?(\d+)\s*[.:,/ ]\s*H?(\d+)\s*$", re.IGNORECASE)


def error_panel(message: str, *, title: str = "Cannot show this") -> html.Div:
    """A red panel with one actionable message; the server keeps running."""
    return html.Div(
        [html.Strong(title), html.P(message, className="panel-message")],
        className="panel error-panel",
        role="alert",
    )


def needs_panel(what: str, detail: str) -> html.Div:
    """Says which part of the workbench a view waits for, instead of showing invented data."""
    return html.Div(
        [html.Strong(f"Needs {what}"), html.P(detail, className="panel-message")],
        className="panel needs-panel",
    )


def note(text: str) -> html.P:
    return html.P(text, className="note")


def href(path: str, **query: object) -> str:
    """``/path?key=value`` with the Nones left out."""
    params = {k: v for k, v in query.items() if v is not None and v != ""}
    return f"{path}?{urlencode(params)}" if params else path


def model_line(info: ModelInfo) -> str:
    kind = "causal" if info.causal else "bidirectional"
    gqa = (
        f", {info.n_kv_heads} KV heads (groups of {info.group_size})"
        if info.group_size > 1
        else ", no GQA"
    )
    return (
        f"{info.name} · {info.architecture} · {info.n_layers} layers × {info.n_heads} heads"
        f"{gqa} · {kind}"
    )


def run_header(key: str, info: ModelInfo, *links: tuple[str, str]) -> html.Div:
    """Run key, model line and links to the other views of the same run."""
    return html.Div(
        [
            html.Div([html.Span("run ", className="muted"), html.Code(key)]),
            html.Div(model_line(info), className="muted"),
            html.Div(
                [dcc.Link(text, href=target, className="pill") for text, target in links],
                className="pill-row",
            ),
        ],
        className="run-header",
    )


def parse_heads(text: str | None, info: ModelInfo) -> list[tuple[int, int]]:
    """``"3.2, L4H1, 5:0"`` -> [(3, 2), (4, 1), (5, 0)]; raises ValueError naming a bad item."""
    heads: list[tuple[int, int]] = []
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        compact = re.fullmatch(r"L(\d+)H(\d+)", item, re.IGNORECASE)
        match = compact or _HEAD.match(item)
        if match is None:
            raise ValueError(f"{item!r} is not a head; write layer.head, e.g. 3.2 or L3H2")
        layer, head = int(match.group(1)), int(match.group(2))
        if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
            raise ValueError(
                f"{item!r} is outside the model ({info.n_layers} layers × {info.n_heads} heads)"
            )
        if (layer, head) not in heads:
            heads.append((layer, head))
    return heads


def format_heads(heads: list[tuple[int, int]]) -> str:
    return ", ".join(f"{layer}.{head}" for layer, head in heads)


def job_controls(start: str, prefix: str, label: str) -> html.Div:
    """A background job's start button (id ``start``), its cancel button and progress bar
    (``{prefix}-cancel``, ``{prefix}-progress``, ``{prefix}-progress-text``): what
    `job_options` wires to the job's callback."""
    return html.Div(
        [
            html.Button(label, id=start, className="button"),
            html.Button(
                "cancel", id=f"{prefix}-cancel", className="button secondary", disabled=True
            ),
            html.Progress(id=f"{prefix}-progress", value="0", max="1"),
            html.Span("", id=f"{prefix}-progress-text", className="muted"),
        ],
        className="progress-row",
    )


def job_options(start: str, prefix: str, *, interval: int, **extra: Any) -> dict[str, Any]:
    """The keyword arguments that make a Dash callback the background job of `job_controls`:
    start disabled and cancel enabled while it runs, progress as (value, max, text), and the
    browser polling the job every ``interval`` ms."""
    return dict(
        background=True,
        running=[
            (Output(start, "disabled"), True, False),
            (Output(f"{prefix}-cancel", "disabled"), False, True),
        ],
        progress=[
            Output(f"{prefix}-progress", "value"),
            Output(f"{prefix}-progress", "max"),
            Output(f"{prefix}-progress-text", "children"),
        ],
        cancel=[Input(f"{prefix}-cancel", "n_clicks")],
        interval=interval,
        **extra,
    )
