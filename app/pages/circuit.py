"""Circuit: the IOI-style circuit stored in a run, as a graph of head classes."""

from __future__ import annotations

from dash import html

from app.components import needs_panel


def layout(run: str | None = None, **_q: str) -> html.Div:
    return html.Div(
        [html.H2("Circuit"), needs_panel("interventions/circuit.py", "not landed yet")],
        className="page",
    )
