"""Figures: one colour scale per score, KV groups drawn in, large grids stay one trace."""

from __future__ import annotations

import numpy as np
import pytest

from app import figures as figs
from app.components import parse_heads
from workbench.models import ModelInfo


def _info(n_layers: int = 30, n_heads: int = 32, n_kv_heads: int = 8) -> ModelInfo:
    return ModelInfo("m", "local", "r", "LlamaForCausalLM", n_layers, n_heads, n_kv_heads,
                     64, 2048, True, 4096, "0")  # fmt: skip


def test_score_scale_is_the_same_wherever_the_score_appears() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((30, 32)) * 0.4, rng.random((2, 4)) * 0.9
    assert figs.score_scale("sink", a) == figs.score_scale("sink", b)  # [0, 1] -> [0, 1]
    assert figs.score_scale("sink", a).zmin == 0 and figs.score_scale("sink", a).zmax == 1
    wide = figs.score_scale("value_drain", a * 5, b * 3)  # other ranges span what is shown
    assert (wide.zmin, wide.zmax) == pytest.approx(
        (min(a.min() * 5, b.min() * 3), max(a.max() * 5, b.max() * 3))
    )
    # an unknown score gets a stable scale from its name
    assert (
        figs.score_scale("new_probe", a).colorscale == figs.score_scale("new_probe", b).colorscale
    )


def test_atlas_grid_of_30_layers_by_32_heads_with_kv_groups() -> None:
    info = _info()
    values = np.linspace(0, 1, 30 * 32).reshape(30, 32)
    fig = figs.atlas_heatmap(info, values, "sink", value_range=(0.5, 1.0), selected=values > 0.9)
    heatmap = fig.data[0]
    assert heatmap.type == "heatmap" and len(fig.data) == 2  # the grid and the label dots
    assert np.isnan(np.asarray(heatmap.z, dtype=float)[values < 0.5]).all()  # greyed out
    assert np.asarray(heatmap.customdata).shape == (30, 32)  # the real values stay in hover
    kv_lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.x0 for s in kv_lines) == [3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5]
    assert "L29 H31 · KV 7" in np.asarray(heatmap.text)[29, 31]
    assert fig.layout.height <= 720  # fits a 800 px screen with the controls above


def test_no_kv_lines_without_grouped_query_attention() -> None:
    fig = figs.atlas_heatmap(_info(4, 8, 8), np.zeros((4, 8)), "entropy")
    assert not fig.layout.shapes


def test_parse_heads() -> None:
    info = _info(4, 8, 2)
    assert parse_heads("3.2, L1H0; 2:7, 3.2", info) == [(3, 2), (1, 0), (2, 7)]
    with pytest.raises(ValueError, match="outside the model"):
        parse_heads("4.0", info)
    with pytest.raises(ValueError, match="not a head"):
        parse_heads("three", info)


def test_compare_keeps_each_scores_colour_scale() -> None:
    info = _info(4, 8, 2)
    rng = np.random.default_rng(1)
    a, b = rng.random((4, 8)), rng.random((4, 8)) * 3
    one = figs.compare_heatmaps(info, a, info, b, ("sink", "sink"), titles=("A", "B"))
    shown = [t.showscale for t in one.data]
    assert shown == [False, True, None] and one.data[0].zmax == one.data[1].zmax == b.max()
    two = figs.compare_heatmaps(info, a, info, b, ("sink", "entropy"), titles=("A", "B"))
    assert two.data[0].colorscale != two.data[1].colorscale  # Viridis vs Cividis, as on the atlas
    assert (two.data[0].zmin, two.data[0].zmax) == (0, 1)
    assert np.allclose(two.data[2].z, b - a)  # the difference panel
    mixed = figs.compare_heatmaps(info, a, _info(6, 8, 4), rng.random((6, 8)), ("sink", "sink"),
                                  titles=("A", "B"))  # fmt: skip
    assert len(mixed.data) == 2  # different shapes: no difference panel
