"""The explorer draws the notebook's figures (workbench.figures): a run's atlas grid is the
scan result's heatmap, its fingerprint map the atlas's own plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from dash import dcc

from app import catalog
from app.pages import atlas as atlas_page
from workbench.head_atlas import build_atlas
from workbench.scanner import ScanResult
from workbench.store import open_run


def _figure_json(fig) -> dict:
    data = json.loads(fig.to_json())
    data["layout"].pop("title", None)  # each front titles it in its own words
    return data


def _graphs(component) -> list[dcc.Graph]:
    if isinstance(component, dcc.Graph):
        return [component]
    children = getattr(component, "children", None) or []
    children = children if isinstance(children, list) else [children]
    return [g for child in children for g in _graphs(child)]


def test_atlas_page_draws_the_scan_results_figures(runs_dir: Path) -> None:
    catalog.configure(catalog.RunCatalog(runs_dir))
    with open_run(runs_dir / "a.h5") as run:
        result = ScanResult(run.model, {name: run.score(name) for name in run.score_names})
        atlas = build_atlas(run)
        info, sink = run.model, run.score("sink").values
    grid, _ = atlas_page._grid("score:sink", None, "a.h5")
    assert _figure_json(grid) == _figure_json(result.heatmap("sink"))
    (graph,) = _graphs(atlas_page._embedding("score:sink", "a.h5"))
    index = atlas.frame["layer"].to_numpy() * info.n_heads + atlas.frame["head"].to_numpy()
    expected = atlas.plot(colour=sink.ravel()[index], colour_name="sink",
                          group_size=info.group_size)  # fmt: skip
    assert _figure_json(graph.figure) == _figure_json(expected)
    np.testing.assert_allclose(graph.figure.data[0].marker.color, sink.ravel()[index])
