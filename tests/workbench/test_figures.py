"""Core figures: the data each figure draws is the input table, with the labels, colour scales
and hover text both fronts share; one colour scale per score; large grids stay one trace."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench import figures as figs
from workbench.errors import ShapeError
from workbench.models import ModelInfo
from workbench.scanner import ScanResult
from workbench.scores import ScoreTable


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


def test_score_grid_draws_the_table_with_head_and_layer_axes() -> None:
    info = _info(3, 4, 2)
    values = np.arange(12, dtype=float).reshape(3, 4) / 12  # [n_layers, n_heads]
    fig = figs.score_heatmap(info, values, "sink", title="t")
    (grid,) = fig.data
    np.testing.assert_array_equal(np.asarray(grid.z, dtype=float), values)
    assert list(grid.x) == [0, 1, 2, 3] and list(grid.y) == [0, 1, 2]
    assert grid.colorscale == go.Heatmap(colorscale="Viridis").colorscale  # sink's scale
    assert (grid.zmin, grid.zmax) == (0, 1)
    assert grid.colorbar.title.text == "sink"
    assert np.asarray(grid.text)[2, 3] == "L2 H3 · KV 1<br>sink"  # the cell's head and KV head
    assert fig.layout.xaxis.title.text == "head (KV groups of 2)"
    assert fig.layout.yaxis.title.text == "layer"
    assert tuple(fig.layout.yaxis.range) == (2.5, -0.5)  # layer 0 on top
    assert fig.layout.title.text == "t"
    with pytest.raises(ShapeError, match=r"\[n_layers, n_heads\] = \(3, 4\)"):
        figs.score_heatmap(info, values.T, "sink")


def test_atlas_grid_of_30_layers_by_32_heads_with_kv_groups() -> None:
    info = _info()
    values = np.linspace(0, 1, 30 * 32).reshape(30, 32)
    fig = figs.score_heatmap(info, values, "sink", value_range=(0.5, 1.0), selected=values > 0.9)
    heatmap = fig.data[0]
    assert heatmap.type == "heatmap" and len(fig.data) == 2  # the grid and the label dots
    assert np.isnan(np.asarray(heatmap.z, dtype=float)[values < 0.5]).all()  # greyed out
    assert np.asarray(heatmap.customdata).shape == (30, 32)  # the real values stay in hover
    dots = fig.data[1]
    assert sorted(zip(dots.y, dots.x, strict=True)) == sorted(
        zip(*np.nonzero(values > 0.9), strict=True)
    )
    kv_lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.x0 for s in kv_lines) == [3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5]
    assert "L29 H31 · KV 7" in np.asarray(heatmap.text)[29, 31]
    assert fig.layout.height <= 720  # fits a 800 px screen with the controls above


def test_no_kv_lines_without_grouped_query_attention() -> None:
    fig = figs.score_heatmap(_info(4, 8, 8), np.zeros((4, 8)), "entropy")
    assert not fig.layout.shapes


def test_scan_result_heatmap_is_the_core_score_grid() -> None:
    info = _info(2, 4, 2)
    values = np.array([[0.1, 0.9, 0.2, 0.4], [0.7, 0.0, 0.3, 0.95]])
    table = ScoreTable("sink", values, "first-token mass", threshold=0.5, label="sink")
    result = ScanResult(info, {"sink": table, "entropy": ScoreTable("entropy", values, "H")})
    fig = result.heatmap("sink")
    expected = figs.score_heatmap(
        info, table.values, "sink", selected=table.selected, title="m: sink"
    )
    assert fig.to_json() == expected.to_json()
    assert result.plot().to_json() == expected.to_json()  # the labelled score
    with pytest.raises(KeyError, match="no score 'nope' in this scan"):
        result.plot("nope")


def test_label_grid_counts_the_labelled_heads() -> None:
    info = _info(2, 4, 2)
    mask = np.array([[True, False, False, True], [False, False, False, True]])
    fig = figs.label_heatmap(info, mask, "sink")
    np.testing.assert_array_equal(np.asarray(fig.data[0].z, dtype=float), mask.astype(float))
    assert np.asarray(fig.data[0].customdata)[1, 3] == "yes"
    assert fig.layout.title.text == "label sink: 3 of 8 heads"


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


def test_pattern_has_token_labels_on_both_axes() -> None:
    pattern = np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None]  # [q_pos, k_pos]
    labels = ["0:the", "1:·cat", "2:·sat"]
    fig = figs.pattern_heatmap(pattern, labels, title="L0 H1")
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), pattern)
    assert list(fig.layout.xaxis.ticktext) == list(fig.layout.yaxis.ticktext) == labels
    assert fig.layout.xaxis.title.text == "key (attended to)"
    assert fig.layout.yaxis.title.text == "query"
    assert np.asarray(fig.data[0].customdata)[2, 1] == "2:·sat → 1:·cat"
    margin = fig.layout.margin
    plot_width = fig.layout.width - margin.l - margin.r
    assert plot_width == fig.layout.height - margin.t - margin.b  # square cells
    with pytest.raises(ShapeError, match=r"\[q_pos, k_pos\] = \(2, 2\)"):
        figs.pattern_heatmap(pattern, labels[:2], title="")


def test_plot_attention_draws_the_heads_pattern(tiny_model) -> None:
    text = "when mary and john went to the store"
    ids = tiny_model.tokenize(text)
    fig = figs.plot_attention(tiny_model, text, 1, 3)
    pattern = figs.head_pattern(tiny_model, ids, 1, 3)  # [q_pos, k_pos]
    np.testing.assert_allclose(np.asarray(fig.data[0].z), pattern)
    np.testing.assert_allclose(pattern.sum(1), 1, atol=1e-5)
    assert np.allclose(np.triu(pattern, 1), 0)  # causal
    assert list(fig.layout.xaxis.ticktext) == figs.token_labels(tiny_model, ids.numpy())
    assert fig.layout.title.text == f"{tiny_model.info.name} L1 H3"
    with pytest.raises(ShapeError, match="outside the model's 2 layers x 4 heads"):
        figs.head_pattern(tiny_model, ids, 2, 0)


def _atlas_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "cluster": [0, 1, 0, 1],
            "x": [0.1, 0.2, 0.3, 0.4],
            "y": [1.0, 2.0, 3.0, 4.0],
            "labels": ["sink", "", "", "sink"],
            "sink": [0.9, 0.1, 0.2, 0.8],
        }
    )


def test_atlas_scatter_by_cluster_or_by_a_score() -> None:
    frame = _atlas_frame()
    by_cluster = figs.atlas_scatter(frame, ["sink"], method="PCA")
    assert [t.name for t in by_cluster.data] == ["cluster 0", "cluster 1"]
    first = by_cluster.data[0]
    assert list(first.x) == [0.1, 0.3] and [list(p) for p in first.customdata] == [[0, 0], [1, 0]]
    assert first.text[0] == "L0 H0 · cluster 0<br>labels: sink<br>sink = 0.900"
    assert by_cluster.layout.xaxis.title.text == "PCA 1"
    colour = np.array([0.5, 0.25, 0.0, 1.0])
    by_score = figs.atlas_scatter(frame, ["sink"], group_size=2, colour=colour, colour_name="x")
    points, *legend = by_score.data
    np.testing.assert_array_equal(points.marker.color, colour)
    assert list(points.marker.symbol) == ["circle", "square", "circle", "square"]
    # the shapes get a legend: one trace per cluster with its shape and no point
    assert [(t.name, t.marker.symbol, tuple(t.x)) for t in legend] == [
        ("cluster 0", "circle", (None,)),
        ("cluster 1", "square", (None,)),
    ]
    assert not points.showlegend
    assert (points.marker.cmin, points.marker.cmax) == (0, 1)
    assert (
        points.text[3]
        == "L1 H1 · KV 0 · cluster 1<br>labels: sink<br><b>x = 1.000</b><br>sink = 0.800"
    )


def test_effect_bars_show_each_metric_with_its_ci() -> None:
    table = pd.DataFrame(
        {
            "diff": [-0.5, 0.1],
            "ci_low": [-0.7, 0.0],
            "ci_high": [-0.3, 0.2],
            "control_diff": [-0.05, 0.0],
            "control_ci_low": [-0.1, -0.1],
            "control_ci_high": [0.0, 0.1],
        },
        index=pd.Index(["logit_diff", "accuracy"], name="metric"),
    )
    fig = figs.effect_bars(table, confidence=0.9)
    chosen, control = fig.data
    assert list(chosen.x) == ["logit_diff", "accuracy"] and list(chosen.y) == [-0.5, 0.1]
    np.testing.assert_allclose(chosen.error_y.array, [0.2, 0.1])
    np.testing.assert_allclose(chosen.error_y.arrayminus, [0.2, 0.1])
    assert list(control.y) == [-0.05, 0.0] and control.name == "matched random heads"
    assert fig.layout.title.text == "change of each metric (90% bootstrap CI)"
    assert fig.layout.yaxis.title.text == "with − without"
    alone = figs.effect_bars(table[["diff", "ci_low", "ci_high"]], confidence=0.9)
    assert [t.name for t in alone.data] == ["chosen heads"]  # no control was run


def test_grids_label_every_layer() -> None:
    info = _info(30, 9, 3)
    fig = figs.score_heatmap(info, np.zeros((30, 9)), "sink")
    assert list(fig.layout.yaxis.tickvals) == list(range(30))  # odd layers too
    assert list(fig.layout.xaxis.tickvals) == list(range(9))


def test_one_quantity_on_two_domains_has_one_colour_map() -> None:
    assert figs.quantity("sink_mass_code") == figs.quantity("sink_mass_prose") == "sink_mass"
    assert figs.quantity("sink_mass") == "sink_mass"
    assert figs.quantity("retrieval_score") == "retrieval_score"  # "score" is no domain
    rng = np.random.default_rng(2)
    a, b = rng.random((4, 8)) * 0.5, rng.random((4, 8)) * 0.5 + 0.5
    assert (
        figs.score_scale("sink_mass_code", a).colorscale
        == figs.score_scale("sink_mass_prose", b).colorscale
    )
    info = _info(4, 8, 2)
    fig = figs.compare_heatmaps(
        info, a, info, b, ("sink_mass_prose", "sink_mass_code"), titles=("A", "B")
    )
    left, right, _ = fig.data
    assert left.colorscale == right.colorscale and (left.zmin, left.zmax) == (0, 1)
    assert [left.showscale, right.showscale] == [False, True]  # one colour bar for both


def test_difference_scale_is_anchored_to_the_values_range() -> None:
    info = _info(4, 8, 2)
    a = np.full((4, 8), 0.5)
    b = a + np.random.default_rng(3).normal(0, 0.001, (4, 8))  # noise on a [0, 1] score
    diff = figs.compare_heatmaps(info, a, info, b, ("sink", "sink"), titles=("A", "B")).data[2]
    assert (diff.zmin, diff.zmax) == (-1.0, 1.0)  # the score's range, not ±0.003
    wide = figs.compare_heatmaps(info, a * 10, info, b * 10, ("x", "x"), titles=("A", "B"))
    lo, hi = min((a * 10).min(), (b * 10).min()), max((a * 10).max(), (b * 10).max())
    assert wide.data[2].zmax == pytest.approx(hi - lo)


def test_layer_patterns_draw_every_head_on_one_scale() -> None:
    rng = np.random.default_rng(4)
    patterns = rng.random((9, 5, 12))  # [n_heads, q_rows, k_pos]: rows 7..11 of 12 tokens
    labels = [f"{i}:t{i}" for i in range(12)]
    fig = figs.layer_patterns(patterns, labels, layer=3, chosen=4, window_start=7)
    assert len(fig.data) == 9  # trace i is head i (a click reports it)
    np.testing.assert_allclose(np.asarray(fig.data[4].z), patterns[4], rtol=1e-6)
    assert all((t.zmin, t.zmax) == (0, 1) for t in fig.data)
    assert [t.showscale for t in fig.data].count(True) == 1
    assert list(fig.data[2].y) == labels[7:] and list(fig.data[2].x) == labels
    assert "%{y} → %{x}" in fig.data[2].hovertemplate  # query row 0 is position 7
    titles = [a.text for a in fig.layout.annotations]
    assert titles[4] == "<b>H4 ◀</b>" and titles[0] == "H0"
    assert len({t.xaxis for t in fig.data}) == 9  # 9 heads: rows of 5 and 4 panels
    assert fig.layout.xaxis5.domain[1] > 0.95 and fig.layout.xaxis6.domain[0] < 0.05
    with pytest.raises(ShapeError, match="do not fit"):
        figs.layer_patterns(patterns, labels[:10], layer=3)


def test_logit_attribution_bars_per_position() -> None:
    values = np.array([0.5, -0.25, np.nan])
    fig = figs.logit_attribution_bars(values, ["0:a", "1:b", "2:c"], ["x", "y", "z"], title="t")
    (bars,) = fig.data
    np.testing.assert_array_equal(np.asarray(bars.y, dtype=float), values)
    assert list(bars.customdata) == ["x", "y", "z"]
    assert bars.marker.color[0] != bars.marker.color[1]  # promoted vs suppressed
    with pytest.raises(ShapeError):
        figs.logit_attribution_bars(values, ["0:a"], ["x", "y", "z"], title="t")


def test_sweep_heatmap_is_centred_on_zero() -> None:
    info = _info(2, 4, 2)
    values = np.array([[0.1, -0.4, 0.0, np.nan], [0.2, 0.0, 0.0, 0.05]])
    fig = figs.sweep_heatmap(info, values, "accuracy")
    (grid,) = fig.data
    assert (grid.zmin, grid.zmax) == (-0.4, 0.4)
    assert grid.colorbar.title.text == "Δ accuracy"
    with pytest.raises(ShapeError):
        figs.sweep_heatmap(info, values.T, "accuracy")


def test_class_heatmap_colours_each_circuit_class() -> None:
    info = _info(3, 4, 2)
    classes = {(2, 1): "name mover", (1, 0): "s-inhibition", (0, 3): "name mover"}
    fig = figs.class_heatmap(info, classes)
    grid, *legend = fig.data
    assert [t.name for t in legend] == ["name mover", "s-inhibition"]
    z = np.asarray(grid.z)
    assert z[2, 1] == z[0, 3] != z[1, 0] and z[0, 0] == 0
    assert np.asarray(grid.customdata)[0, 0] == figs.NOT_IN_CIRCUIT
    assert fig.layout.title.text == "circuit: 3 of 12 heads in 2 classes"


def test_circuit_graph_keeps_the_heads_of_a_layer_apart() -> None:
    from types import SimpleNamespace as Node

    heads = [Node(layer=5, head=h, role="name mover", evidence={}) for h in (0, 3, 7)]
    heads.append(Node(layer=2, head=3, role="induction", evidence={"dla": 0.25}))
    edges = [
        Node(sender="2.3", receiver="5.3", via="k", effect=-0.5),
        Node(sender="2.3", receiver="5.3", via="v", effect=-0.1),
        Node(sender="5.0", receiver="logits", via="direct", effect=None),
        Node(sender="9.9", receiver="logits", via="direct", effect=1.0),  # not in the circuit
    ]
    fig = figs.circuit_graph(heads, edges, title="t")
    movers = next(t for t in fig.data if t.name == "name mover")
    assert sorted(zip(movers.x, movers.y, strict=True)) == [(0, 5), (3, 5), (7, 5)]
    arrows = fig.layout.annotations
    assert len(arrows) == 3  # the edge from a head outside the circuit is left out
    k, v = arrows[0], arrows[1]  # two paths into one head land apart, widths by effect
    assert k.x != v.x and k.arrowwidth > v.arrowwidth
    assert list(fig.layout.yaxis.tickvals) == [2, 5]
    induction = next(t for t in fig.data if t.name == "induction")
    assert "DLA 0.250" in induction.hovertext[0]


def test_a_per_layer_quantity_is_drawn_once_per_layer() -> None:
    info = _info(3, 4, 2)
    per_layer = np.array([0.75, 7.25, 159.0])  # exact in float32
    fig = figs.layer_profile(info, per_layer, "residual_peak", title="t")
    (line,) = fig.data
    assert list(line.x) == [0, 1, 2] and list(line.y) == per_layer.tolist()
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.title.text == "t"
    with pytest.raises(ShapeError, match=r"\[n_layers\] = \(3,\)"):
        figs.layer_profile(info, np.ones((3, 4)), "residual_peak", title="t")
    table = ScoreTable("residual_peak", np.repeat(per_layer[:, None], 4, axis=1), "per layer")
    result = ScanResult(info, {"residual_peak": table})
    assert list(result.plot("residual_peak").data[0].y) == per_layer.tolist()
    assert result.heatmap("residual_peak").data[0].type == "heatmap"  # the grid stays available
