"""Plotly figures of attention heads: one builder per view, for the notebook and the explorer.

Every view of heads is built here, from plain arrays and tables, and both fronts call the same
function: a notebook through the result objects (``ScanResult.heatmap`` / ``.plot()``,
``Atlas.plot()``, ``EvalResult.plot()``, ``wb.plot_attention``), the Dash explorer
(``app/pages``) directly. So a head looks the same in both, with the same colours, axis labels
and hover text. A plugin's figure of its own result (``Circuit.plot``, which the explorer shows
as it is) takes the shared look from :func:`apply_style`.

Colour. A score keeps one colour scale wherever it appears (:func:`score_scale`): its colours
come from a fixed table (or, for a score the table does not know, a stable hash of its name),
and a score whose values lie in [0, 1] always spans exactly [0, 1], so a colour means the same
number in a scan's heatmap, the explorer's atlas, the comparison and the head page. Other scores
span the range of what is shown together. Differences use a diverging scale centred on 0.

Layer × head grids (:func:`score_heatmap`, :func:`label_heatmap`, :func:`compare_heatmaps`)
put layer 0 at the top, as TransformerLens's ``imshow`` of head scores does, and draw
grouped-query attention in: thin lines between KV groups, and the KV head of every query head
in its hover text (query head h reads KV head ``h // group_size``, the HF ``repeat_kv`` rule).
One heatmap trace holds all heads, so a 30 × 32 grid stays one draw call.

Patterns (:func:`head_pattern`, :func:`plot_attention`) come from TransformerLens's
``blocks.{l}.attn.hook_pattern`` (the pattern capture path, :func:`workbench.capture.
run_with_patterns`): exact and O(L²), for prompts of up to a few hundred tokens. Statistics along
positions at any length come from the streamed path and are drawn by :func:`position_lines`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.capture import run_with_patterns
from workbench.errors import ShapeError
from workbench.models import Model, ModelInfo

KNOWN_SCALES = {
    "sink": "Viridis",
    "hidden_sink": "Plasma",
    "entropy": "Cividis",
    "normalized_entropy": "Cividis",
    "value_drain": "Tealgrn",
    "residual_peak": "Burg",
    "retrieval": "Magma",
    "dormant": "Purples",
    "positional": "Oranges",
    "previous_token": "Oranges",
    "induction": "Greens",
}
FALLBACK_SCALES = ["Blues", "Greens", "Purples", "Oranges", "Teal", "Sunset", "Emrld", "Peach"]
PATTERN_SCALE = "Blues"
DIFF_SCALE = "RdBu_r"
LABEL_COLOURS = ("#e9ecef", "#c0392b")  # not labelled, labelled
EFFECT_COLOURS = ("#c0392b", "#6c757d")  # the chosen heads, the matched random control
FONT = {"family": "Inter, Segoe UI, Helvetica, Arial, sans-serif", "size": 12}


@dataclass(frozen=True)
class ColourScale:
    colorscale: str | list
    zmin: float
    zmax: float


LABEL_SCALE = ColourScale([[0, LABEL_COLOURS[0]], [1, LABEL_COLOURS[1]]], 0.0, 1.0)


def score_scale(name: str, *tables: np.ndarray) -> ColourScale:
    """The colour scale of score ``name`` for the given ``[n_layers, n_heads]`` tables."""
    if name in KNOWN_SCALES:
        colorscale = KNOWN_SCALES[name]
    else:
        digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
        colorscale = FALLBACK_SCALES[digest % len(FALLBACK_SCALES)]
    finite = np.concatenate([np.asarray(t, dtype=float).ravel() for t in tables] or [np.zeros(1)])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return ColourScale(colorscale, 0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0.0 and hi <= 1.0:
        return ColourScale(colorscale, 0.0, 1.0)
    if hi == lo:
        hi = lo + 1.0
    return ColourScale(colorscale, lo, hi)


def apply_style(fig: go.Figure, *, height: int, title: str | None = None) -> go.Figure:
    """The look every workbench figure shares: its font, a left-aligned title, white
    background, margins, and clicks reported as events (the explorer opens the clicked head)."""
    fig.update_layout(
        height=height,
        margin={"l": 60, "r": 20, "t": 56 if title else 28, "b": 48},
        font=FONT,
        title={"text": title, "x": 0, "xanchor": "left", "font": {"size": 14}} if title else None,
        plot_bgcolor="white",
        paper_bgcolor="white",
        clickmode="event",
    )
    return fig


def grid_height(n_layers: int) -> int:
    """Pixel height of a layer × head grid: a row per layer, at most 720 (an 800 px screen)."""
    return int(min(720, max(300, 20 * n_layers + 110)))


def _kv_decorations(fig: go.Figure, info: ModelInfo, subplot: int = 1) -> None:
    """Lines between KV groups (GQA), so the heads that share a KV cache read as one block.

    The shapes are appended in one assignment: plotly's ``add_vline`` re-validates the layout
    on every call (1.5 s for the 7 lines of a 32-head grid on a loaded 2-core machine)."""
    group = info.group_size
    if group <= 1:
        return
    axis = "" if subplot == 1 else str(subplot)
    lines = [
        {
            "type": "line",
            "xref": f"x{axis}",
            "yref": f"y{axis} domain",
            "x0": g * group - 0.5,
            "x1": g * group - 0.5,
            "y0": 0,
            "y1": 1,
            "line": {"color": "#212529", "width": 1.5},
        }
        for g in range(1, info.n_kv_heads)
    ]
    fig.layout.shapes = (*fig.layout.shapes, *lines)


def _hover(info: ModelInfo, label: str) -> np.ndarray:
    """``[n_layers, n_heads]`` hover text ``"L{layer} H{head} · KV {kv}<br>{label}"``."""
    layers, heads = np.indices((info.n_layers, info.n_heads))
    kv = heads // info.group_size
    text = np.char.add(
        np.char.add(np.char.add("L", layers.astype(str)), np.char.add(" H", heads.astype(str))),
        np.char.add(" · KV ", kv.astype(str)),
    )
    return np.char.add(text, f"<br>{label}")


def _grid_trace(
    info: ModelInfo, z: np.ndarray, label: str, scale: ColourScale, **options: object
) -> go.Heatmap:
    """The heatmap trace of a layer × head grid (``z: [n_layers, n_heads]``): one cell per head
    with a gap between cells, hover naming the head and its KV head; ``options`` are the
    trace's other properties (hover template, colour bar)."""
    return go.Heatmap(
        z=z,
        x=list(range(info.n_heads)),
        y=list(range(info.n_layers)),
        colorscale=scale.colorscale,
        zmin=scale.zmin,
        zmax=scale.zmax,
        text=_hover(info, label),
        xgap=1,
        ygap=1,
        **options,
    )


def _grid_axes(fig: go.Figure, info: ModelInfo, row: int | None = None, col: int | None = None):
    step = 1 if info.n_heads <= 16 else 2
    fig.update_xaxes(
        title_text="head" + (f" (KV groups of {info.group_size})" if info.group_size > 1 else ""),
        tickmode="array",
        tickvals=list(range(0, info.n_heads, step)),
        showgrid=False,
        zeroline=False,
        range=[-0.5, info.n_heads - 0.5],  # exactly the grid: label dots add no padding
        constrain="domain",
        row=row,
        col=col,
    )
    ystep = 1 if info.n_layers <= 16 else 2
    fig.update_yaxes(
        title_text="layer",
        range=[info.n_layers - 0.5, -0.5],  # layer 0 on top
        tickmode="array",
        tickvals=list(range(0, info.n_layers, ystep)),
        showgrid=False,
        zeroline=False,
        row=row,
        col=col,
    )


def score_heatmap(
    info: ModelInfo,
    values: np.ndarray,
    name: str,
    *,
    value_range: tuple[float, float] | None = None,
    selected: np.ndarray | None = None,
    scale: ColourScale | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer × head heatmap of one score (``values: [n_layers, n_heads]``).

    Heads outside ``value_range`` are greyed out (their cell is empty; the hover still shows
    the value); ``selected`` (bool ``[n_layers, n_heads]``, e.g. the probe's label) marks heads
    with a dot.
    """
    values = np.asarray(values, dtype=float)  # [n_layers, n_heads]
    if values.shape != (info.n_layers, info.n_heads):
        raise ShapeError(
            f"score {name!r} must be [n_layers, n_heads] = {(info.n_layers, info.n_heads)}, "
            f"got {values.shape}"
        )
    scale = scale or score_scale(name, values)
    shown = values.copy()
    if value_range is not None:
        lo, hi = value_range
        shown[(values < lo) | (values > hi)] = np.nan
    fig = go.Figure(
        _grid_trace(
            info,
            shown,
            name,
            scale,
            customdata=values,
            hovertemplate="%{text} = %{customdata:.3f}<extra></extra>",
            colorbar={"title": {"text": name, "side": "right"}, "thickness": 14},
        )
    )
    if selected is not None and selected.any():
        layers, heads = np.nonzero(selected)
        fig.add_trace(
            go.Scatter(
                x=heads,
                y=layers,
                mode="markers",
                marker={"symbol": "circle", "size": 5, "color": "white", "line": {"width": 1}},
                hoverinfo="skip",
                showlegend=False,
            )
        )
    _kv_decorations(fig, info)
    _grid_axes(fig, info)
    return apply_style(fig, height=grid_height(info.n_layers), title=title)


def label_heatmap(info: ModelInfo, mask: np.ndarray, label: str) -> go.Figure:
    """Layer × head grid of one label (``mask: [n_layers, n_heads]`` bool)."""
    z = np.asarray(mask, dtype=float)  # [n_layers, n_heads]
    fig = go.Figure(
        _grid_trace(
            info,
            z,
            label,
            LABEL_SCALE,
            customdata=np.where(mask, "yes", "no"),
            hovertemplate="%{text}: %{customdata}<extra></extra>",
            showscale=False,
        )
    )
    _kv_decorations(fig, info)
    _grid_axes(fig, info)
    n = int(np.asarray(mask).sum())
    title = f"label {label}: {n} of {z.size} heads"
    return apply_style(fig, height=grid_height(info.n_layers), title=title)


MARKER_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x", "star", "hexagon"]


def atlas_scatter(
    frame: pd.DataFrame,
    features: Sequence[str],
    *,
    method: str = "embedding",
    group_size: int | None = None,
    colour: np.ndarray | None = None,
    colour_name: str = "",
    scale: ColourScale | None = None,
    title: str = "",
) -> go.Figure:
    """2-D map of head fingerprints (:attr:`workbench.head_atlas.Atlas.frame`: one row per head with
    ``layer, head, cluster, x, y, labels`` and the ``features`` columns).

    Without ``colour``, one trace per cluster (colour and legend entry per cluster). With
    ``colour`` (one value per row, e.g. a score or a label as 0/1), one trace coloured by it on
    ``scale`` (default :func:`score_scale` of ``colour_name``) and the cluster as the marker
    shape. Every point's hover names the head (and its KV head, given ``group_size``), its
    cluster, labels and fingerprint; ``customdata`` holds ``(layer, head)`` for clicks.
    """
    layers, heads = frame["layer"].to_numpy(), frame["head"].to_numpy()
    clusters = frame["cluster"].to_numpy()
    hover = []
    for i, (layer, head, cluster) in enumerate(zip(layers, heads, clusters, strict=True)):
        kv = f" · KV {head // group_size}" if group_size else ""
        lines = [f"L{layer} H{head}{kv} · cluster {cluster}"]
        if frame["labels"].iloc[i]:
            lines.append(f"labels: {frame['labels'].iloc[i]}")
        if colour is not None:
            lines.append(f"<b>{colour_name} = {colour[i]:.3f}</b>")
        lines += [f"{f} = {frame[f].iloc[i]:.3f}" for f in features if f != colour_name]
        hover.append("<br>".join(lines))
    hover = np.asarray(hover, dtype=object)
    points = np.stack([layers, heads], axis=1)  # [n_rows, 2]
    fig = go.Figure()
    if colour is None:
        for cluster in sorted(set(clusters.tolist())):
            rows = clusters == cluster
            fig.add_trace(
                go.Scatter(
                    x=frame["x"].to_numpy()[rows],
                    y=frame["y"].to_numpy()[rows],
                    mode="markers",
                    name=f"cluster {cluster}",
                    customdata=points[rows],
                    text=hover[rows],
                    hovertemplate="%{text}<extra></extra>",
                    marker={"size": 8, "line": {"width": 0.5, "color": "#343a40"}},
                )
            )
    else:
        scale = scale or score_scale(colour_name, colour)
        fig.add_trace(
            go.Scatter(
                x=frame["x"].to_numpy(),
                y=frame["y"].to_numpy(),
                mode="markers",
                customdata=points,
                text=hover,
                hovertemplate="%{text}<extra></extra>",
                marker={
                    "size": 8,
                    "color": colour,
                    "colorscale": scale.colorscale,
                    "cmin": scale.zmin,
                    "cmax": scale.zmax,
                    "symbol": [MARKER_SYMBOLS[int(c) % len(MARKER_SYMBOLS)] for c in clusters],
                    "line": {"width": 0.5, "color": "#343a40"},
                    "colorbar": {"title": {"text": colour_name, "side": "right"}, "thickness": 14},
                },
            )
        )
    fig.update_xaxes(showticklabels=False, title_text=f"{method} 1", zeroline=False)
    fig.update_yaxes(showticklabels=False, title_text=f"{method} 2", zeroline=False)
    return apply_style(fig, height=420, title=title)


def pattern_heatmap(pattern: np.ndarray, labels: Sequence[str], *, title: str) -> go.Figure:
    """One head's attention pattern ``[q_pos, k_pos]`` with token labels on both axes."""
    n = len(labels)
    if pattern.shape != (n, n):
        raise ShapeError(f"pattern must be [q_pos, k_pos] = {(n, n)}, got {pattern.shape}")
    fig = go.Figure(
        go.Heatmap(
            z=pattern,
            x=list(range(n)),
            y=list(range(n)),
            colorscale=PATTERN_SCALE,
            zmin=0,
            zmax=1,
            customdata=np.array(
                [[f"{labels[q]} → {labels[k]}" for k in range(n)] for q in range(n)]
            ),
            hovertemplate="%{customdata}: %{z:.3f}<extra></extra>",
            colorbar={"title": {"text": "attention", "side": "right"}, "thickness": 14},
        )
    )
    tick_font = 11 if n <= 32 else 9
    cell = min(44.0, max(9.0, 600.0 / n))  # px per token: readable labels, square cells
    fig.update_xaxes(
        tickmode="array",
        tickvals=list(range(n)),
        ticktext=list(labels),
        tickangle=-60,
        tickfont={"size": tick_font},
        title_text="key (attended to)",
        side="bottom",
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(n)),
        ticktext=list(labels),
        tickfont={"size": tick_font},
        autorange="reversed",
        title_text="query",
    )
    # an exact square: the figure is as wide as the cells plus margins and colour bar
    margin = {"l": 110, "r": 110, "t": 56, "b": 120}
    fig = apply_style(fig, height=int(cell * n) + margin["t"] + margin["b"], title=title)
    fig.update_layout(margin=margin, width=int(cell * n) + margin["l"] + margin["r"])
    return fig


def token_labels(model: Model, token_ids: np.ndarray) -> list[str]:
    """Readable, unique labels ``"position:token"`` (whitespace made visible)."""
    pieces = model.tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])
    labels = []
    for position, piece in enumerate(pieces):
        text = str(piece).replace("Ġ", "·").replace("▁", "·").replace("Ċ", "↵").replace("\n", "↵")
        text = text if len(text) <= 12 else text[:11] + "…"
        labels.append(f"{position}:{text}")
    return labels


def head_pattern(model: Model, token_ids: torch.Tensor, layer: int, head: int) -> np.ndarray:
    """``[q_pos, k_pos]`` attention pattern of one head on one prompt (``token_ids: [seq]``)."""
    info = model.info
    if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
        raise ShapeError(
            f"head ({layer}, {head}) is outside the model's {info.n_layers} layers x "
            f"{info.n_heads} heads"
        )
    kept: dict[str, torch.Tensor] = {}

    def keep(at: int, pattern: torch.Tensor) -> None:  # pattern: [head, q_pos, k_pos]
        if at == layer:
            kept["pattern"] = pattern[head].cpu()  # [q_pos, k_pos]

    run_with_patterns(model, token_ids, keep)
    return kept["pattern"].numpy()


def plot_attention(model: Model, text: str, layer: int, head: int) -> go.Figure:
    """Heatmap of head ``(layer, head)``'s attention on ``text``, tokens on both axes (the
    explorer's head page draws the same figure)."""
    ids = model.tokenize(text)  # [seq]
    return pattern_heatmap(
        head_pattern(model, ids, layer, head),
        token_labels(model, ids.numpy()),
        title=f"{model.info.name} L{layer} H{head}",
    )


def position_lines(
    first_token_mass: np.ndarray,
    entropy: np.ndarray,
    received_rate: np.ndarray,
    *,
    title: str,
) -> go.Figure:
    """Streamed statistics along positions: per query (first-token mass, entropy) and per key
    (received attention rate)."""
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=(
            "first-token (sink) mass per query",
            "entropy per query (nats)",
            "received attention rate per key",
        ),
    )
    x = np.arange(len(entropy))
    for row, y, colour in (
        (1, first_token_mass, "#1f77b4"),
        (2, entropy, "#6c757d"),
        (3, received_rate, "#c0392b"),
    ):
        fig.add_trace(
            go.Scatter(x=x, y=y, mode="lines", line={"width": 1.4, "color": colour}),
            row=row,
            col=1,
        )
    fig.update_layout(showlegend=False)
    fig.update_xaxes(title_text="position", row=3, col=1)
    fig.update_annotations(font={"size": 12})
    return apply_style(fig, height=520, title=title)


def compare_heatmaps(
    info_a: ModelInfo,
    values_a: np.ndarray,
    info_b: ModelInfo,
    values_b: np.ndarray,
    names: tuple[str, str],
    *,
    titles: tuple[str, str],
) -> go.Figure:
    """Side-by-side layer × head grids (``values_*: [n_layers, n_heads]``), plus their
    difference (B − A, diverging) when both have the same shape. One score in both: one shared
    colour scale spanning both tables. Two scores (two domains' tables, say): each keeps its own
    scale, as everywhere else."""
    same_score = names[0] == names[1]
    if same_score:
        scales = (score_scale(names[0], values_a, values_b),) * 2
    else:
        scales = (score_scale(names[0], values_a), score_scale(names[1], values_b))
    same_shape = values_a.shape == values_b.shape
    cols = 3 if same_shape else 2
    fig = make_subplots(
        rows=1,
        cols=cols,
        subplot_titles=(*titles, "difference B − A") if same_shape else titles,
        horizontal_spacing=0.1,
    )
    # colour bars right of each panel that needs one (x in paper coordinates)
    right_edge = {2: (0.45, 1.0), 3: (0.27, 0.63, 1.0)}[cols]
    panels = ((info_a, values_a, names[0]), (info_b, values_b, names[1]))
    for col, (info, values, name) in enumerate(panels, start=1):
        scale = scales[col - 1]
        show = col == 2 or not same_score
        fig.add_trace(
            _grid_trace(
                info,
                values,
                name,
                scale,
                hovertemplate="%{text} = %{z:.3f}<extra></extra>",
                colorbar={"x": right_edge[col - 1], "thickness": 10, "len": 0.9},
                showscale=show,
            ),
            row=1,
            col=col,
        )
        _kv_decorations(fig, info, col)
        _grid_axes(fig, info, 1, col)
    if same_shape:
        diff = values_b - values_a
        bound = float(np.nanmax(np.abs(diff))) or 1.0
        fig.add_trace(
            _grid_trace(
                info_a,
                diff,
                "B − A",
                ColourScale(DIFF_SCALE, -bound, bound),
                hovertemplate="%{text} = %{z:+.3f}<extra></extra>",
                colorbar={"x": 1.0, "thickness": 10, "len": 0.9},
            ),
            row=1,
            col=3,
        )
        _kv_decorations(fig, info_a, 3)
        _grid_axes(fig, info_a, 1, 3)
    fig.update_annotations(font={"size": 12})
    height = grid_height(max(info_a.n_layers, info_b.n_layers))
    fig = apply_style(fig, height=height)
    fig.update_layout(margin={"t": 64})  # subplot titles clear of the mode bar
    return fig


def depth_profile(
    series: Sequence[tuple[str, ModelInfo, np.ndarray]], name: str, *, title: str
) -> go.Figure:
    """Per-layer mean of a score (each ``[n_layers, n_heads]``) against relative depth
    (layer / (n_layers − 1)), so runs of models with different depths line up."""
    fig = go.Figure()
    for label, info, values in series:
        depth = np.arange(info.n_layers) / max(info.n_layers - 1, 1)
        fig.add_trace(
            go.Scatter(
                x=depth,
                y=np.nanmean(values, axis=1),
                mode="lines+markers",
                name=label,
                hovertemplate="depth %{x:.2f}: %{y:.3f}<extra>" + label + "</extra>",
            )
        )
    fig.update_xaxes(title_text="relative depth (layer / last layer)", range=[-0.02, 1.02])
    fig.update_yaxes(title_text=f"mean {name} over heads" if name else "mean over heads")
    fig.update_layout(legend={"orientation": "h", "y": -0.25})
    return apply_style(fig, height=360, title=title)


def effect_bars(table: pd.DataFrame, *, confidence: float, title: str = "") -> go.Figure:
    """The change of each metric under an intervention, next to its matched random control.

    ``table`` has one row per metric (the index) and the columns of
    :attr:`interventions.evaluation.EvalResult.table`: ``diff``, ``ci_low``, ``ci_high`` (with −
    without, and its bootstrap CI) and, when a control ran, the same with a ``control_`` prefix.
    Bars are the differences, error bars the ``confidence`` CIs.
    """
    pct = round(100 * confidence)
    metrics = list(table.index)
    groups = [("chosen heads", "", EFFECT_COLOURS[0])]
    if "control_diff" in table.columns:
        groups.append(("matched random heads", "control_", EFFECT_COLOURS[1]))
    fig = go.Figure()
    for label, prefix, colour in groups:
        diff = table[prefix + "diff"].to_numpy(dtype=float)
        high, low = table[prefix + "ci_high"].to_numpy(), table[prefix + "ci_low"].to_numpy()
        fig.add_trace(
            go.Bar(
                x=metrics,
                y=diff,
                name=label,
                marker_color=colour,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": high - diff,
                    "arrayminus": diff - low,
                },
                customdata=np.stack([low, high], axis=1),
                hovertemplate=(
                    f"{label}: %{{y:+.4f}} [%{{customdata[0]:+.4f}}, %{{customdata[1]:+.4f}}]"
                    "<extra>%{x}</extra>"
                ),
            )
        )
    fig.update_layout(
        barmode="group",
        yaxis_title="with − without",
        legend={"orientation": "h", "y": 1.12, "x": 1, "xanchor": "right"},
    )
    fig.add_hline(y=0, line={"color": "#adb5bd", "width": 1})
    return apply_style(
        fig, height=320, title=title or f"change of each metric ({pct}% bootstrap CI)"
    )


def knockout_figure(
    table: pd.DataFrame, metric: str, *, baseline: float, confidence: float, title: str = ""
) -> go.Figure:
    """The top-k knock-out curve: ``metric`` with the k highest-scoring heads knocked out, and
    with as many random heads, against k (Wu et al. 2024's and DuoAttention's test).

    ``table`` has one row per k and the columns of
    :attr:`interventions.evaluation.KnockoutCurve.table`: ``k``, ``all_labelled``, and for the
    metric ``<m>_intervened``, ``<m>_ci_low``/``<m>_ci_high`` (of the difference), ``<m>_control``,
    its CI, and ``<m>_control_draw_min``/``_max`` (the random draws' range, drawn as a band).
    The x axis is categorical (the row of all labelled heads says so); the baseline is a dashed
    line.
    """
    pct = round(100 * confidence)
    x = [
        f"{k} (all labelled)" if flag else str(k)
        for k, flag in zip(table["k"], table["all_labelled"], strict=True)
    ]
    fig = go.Figure()
    low = baseline + table[f"{metric}_control_draw_min"].to_numpy(dtype=float)
    high = baseline + table[f"{metric}_control_draw_max"].to_numpy(dtype=float)
    fig.add_trace(
        go.Scatter(x=x, y=high, mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip")
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=low,
            mode="lines",
            line={"width": 0},
            fill="tonexty",
            fillcolor="rgba(108, 117, 125, 0.15)",
            name="range of the random draws",
            hoverinfo="skip",
        )
    )
    for label, value, prefix, colour in (
        ("top-k heads", f"{metric}_intervened", f"{metric}_", EFFECT_COLOURS[0]),
        (
            "random heads (mean of draws)",
            f"{metric}_control",
            f"{metric}_control_",
            EFFECT_COLOURS[1],
        ),
    ):
        y = table[value].to_numpy(dtype=float)
        ci_low = baseline + table[prefix + "ci_low"].to_numpy(dtype=float)
        ci_high = baseline + table[prefix + "ci_high"].to_numpy(dtype=float)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=label,
                line={"color": colour},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": ci_high - y,
                    "arrayminus": y - ci_low,
                },
                customdata=np.stack([ci_low, ci_high], axis=1),
                hovertemplate=(
                    f"{label}, k=%{{x}}: %{{y:.4f}} [%{{customdata[0]:.4f}}, "
                    "%{customdata[1]:.4f}]<extra></extra>"
                ),
            )
        )
    fig.add_hline(
        y=baseline,
        line={"color": "#adb5bd", "width": 1, "dash": "dash"},
        annotation_text="no knock-out",
    )
    fig.update_layout(
        xaxis_title="heads knocked out (k)",
        yaxis_title=metric,
        legend={"orientation": "h", "y": 1.12, "x": 1, "xanchor": "right"},
    )
    return apply_style(
        fig, height=360, title=title or f"top-k knock-out of {metric} ({pct}% bootstrap CI)"
    )
