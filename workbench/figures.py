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
One heatmap trace holds all heads, so a 30 × 32 grid stays one draw call. A per-layer quantity
(a score every head of a layer shares, ``ScoreTable.layer_values``) is drawn once per layer
instead (:func:`layer_profile`).

The explorer's Head page adds every head of a layer on one prompt (:func:`layer_patterns`) and
a head's direct logit attribution along the prompt (:func:`logit_attribution_bars`); the lab a
per-head sweep (:func:`sweep_heatmap`); circuits are drawn as a class-coloured grid
(:func:`class_heatmap`) and a directed graph (:func:`circuit_graph`, also ``Circuit.plot``).

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
from workbench.tasks.domains import DOMAINS

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


def quantity(name: str) -> str:
    """The quantity a score measures: its name without an input domain's suffix
    (``sink_mass_code`` -> ``sink_mass``, :data:`workbench.tasks.domains.DOMAINS`), so the same
    quantity on two domains is drawn with one colour map."""
    stem, _, suffix = name.rpartition("_")
    return stem if stem and suffix in DOMAINS else name


def score_scale(name: str, *tables: np.ndarray) -> ColourScale:
    """The colour scale of score ``name`` for the given ``[n_layers, n_heads]`` tables; the
    colour map is that of its :func:`quantity`."""
    name = quantity(name)
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
    """Every layer labelled (a grid is read by its layer numbers); every head up to 32 heads,
    every second beyond."""
    step = 1 if info.n_heads <= 32 else 2
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
    fig.update_yaxes(
        title_text="layer",
        range=[info.n_layers - 0.5, -0.5],  # layer 0 on top
        tickmode="array",
        tickvals=list(range(info.n_layers)),
        tickfont={"size": 11 if info.n_layers <= 32 else 8},
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
                showlegend=False,
            )
        )
        for cluster in sorted(set(clusters.tolist())):  # a legend of the marker shapes
            fig.add_trace(
                go.Scatter(
                    x=[None],  # no point: plotly lists a trace without data in no legend
                    y=[None],
                    mode="markers",
                    name=f"cluster {cluster}",
                    marker={
                        "size": 8,
                        "color": "#868e96",
                        "symbol": MARKER_SYMBOLS[int(cluster) % len(MARKER_SYMBOLS)],
                    },
                )
            )
    fig.update_layout(legend={"orientation": "h", "y": -0.08, "title": {"text": "shape: "}})
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


def token_text(model: Model, token_ids: Sequence[int] | np.ndarray) -> list[str]:
    """Each token id as the tokenizer spells it, whitespace made visible (``·`` for a leading
    space, ``↵`` for a newline): how every view shows a token id."""
    pieces = model.tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])
    return [
        str(piece).replace("Ġ", "·").replace("▁", "·").replace("Ċ", "↵").replace("\n", "↵")
        for piece in pieces
    ]


def token_labels(model: Model, token_ids: np.ndarray) -> list[str]:
    """Readable, unique labels ``"position:token"`` (:func:`token_text`, cut at 12 characters)."""
    return [
        f"{position}:{text if len(text) <= 12 else text[:11] + '…'}"
        for position, text in enumerate(token_text(model, token_ids))
    ]


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
    difference (B − A, diverging) when both have the same shape.

    One quantity on both sides (one score, or one quantity on two domains,
    :func:`quantity`): one colour scale spanning both tables and one colour bar. Two
    quantities: each keeps its own scale, as everywhere else. The difference's scale is
    anchored to the values' range (the span of the colour scales shown), not to the largest
    difference, so that a change of 0.002 on a [0, 1] score stays pale.
    """
    same = quantity(names[0]) == quantity(names[1])
    if same:
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
        show = col == 2 or not same
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
        bound = max(s.zmax - s.zmin for s in scales)
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


def layer_profile(info: ModelInfo, values: np.ndarray, name: str, *, title: str) -> go.Figure:
    """A per-layer quantity (``values: [n_layers]``, e.g. ``ScoreTable.layer_values``) as one
    marker per layer: a number that every head of a layer shares is drawn once, not as a grid
    of equal cells."""
    values = np.asarray(values, dtype=float)  # [n_layers]
    if values.shape != (info.n_layers,):
        raise ShapeError(f"{name!r} must be [n_layers] = ({info.n_layers},), got {values.shape}")
    fig = go.Figure(
        go.Scatter(
            x=list(range(info.n_layers)),
            y=values,
            mode="lines+markers",
            name=name,
            hovertemplate="layer %{x}: %{y:.3f}<extra>" + name + "</extra>",
        )
    )
    fig.update_xaxes(title_text="layer", tickmode="array", tickvals=list(range(info.n_layers)))
    fig.update_yaxes(title_text=name)
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


def layer_patterns(
    patterns: np.ndarray,
    labels: Sequence[str],
    *,
    layer: int,
    chosen: int | None = None,
    window_start: int = 0,
) -> go.Figure:
    """Every head of one layer on one prompt, small multiples (``patterns: [n_heads, q_rows,
    k_pos]``, rows ``window_start ..`` of the pattern; ``labels``: one per key position).

    One colour scale (attention 0..1) for all panels, so heads compare at a glance; the hover
    names the head, query and key tokens; ``chosen`` gets a bold panel title. A click on a
    panel reports its trace number, which is the head.
    """
    patterns = np.asarray(patterns, dtype=float)
    n_heads, rows, n_keys = patterns.shape
    if len(labels) != n_keys or window_start + rows > n_keys:
        raise ShapeError(
            f"patterns [n_heads, q_rows, k_pos] = {patterns.shape} do not fit {len(labels)} "
            f"token labels with the window starting at {window_start}"
        )
    grid_rows = int(np.ceil(n_heads / 8))  # at most 8 panels a row, rows as full as can be
    cols = int(np.ceil(n_heads / grid_rows))
    panel = (1080 - 60) / cols  # px: square panels across a page of about 1080 px
    gap_x, gap_y = 0.02, (0.06 if grid_rows > 1 else 0.0)
    width = (1 - gap_x * (cols - 1)) / cols  # of each panel, in paper coordinates
    height = (1 - gap_y * (grid_rows - 1)) / grid_rows
    queries = [labels[window_start + r] for r in range(rows)]
    # the axes are the token labels (unique "position:token"), so the hover reads them from
    # x and y and no per-cell text is sent: 9 heads of 64 tokens are 0.23 MB of JSON
    axis = {"showticklabels": False, "showgrid": False, "zeroline": False, "type": "category"}
    layout: dict = {"annotations": []}
    traces = []
    for h in range(n_heads):
        row, col = divmod(h, cols)
        left, top = col * (width + gap_x), 1 - row * (height + gap_y)
        suffix = "" if h == 0 else str(h + 1)
        layout[f"xaxis{suffix}"] = {**axis, "domain": [left, left + width], "anchor": f"y{suffix}"}
        layout[f"yaxis{suffix}"] = {
            **axis,
            "domain": [top - height, top],
            "anchor": f"x{suffix}",
            "autorange": "reversed",
        }
        layout["annotations"].append(
            {
                "text": f"<b>H{h} ◀</b>" if h == chosen else f"H{h}",
                "x": left + width / 2,
                "y": top,
                "xref": "paper",
                "yref": "paper",
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 11},
            }
        )
        traces.append(
            go.Heatmap(
                z=patterns[h].astype(np.float32),  # sent as float32: half the JSON
                x=list(labels),
                y=queries,
                xaxis=f"x{suffix}",
                yaxis=f"y{suffix}",
                colorscale=PATTERN_SCALE,
                zmin=0,
                zmax=1,
                hovertemplate=f"L{layer} H{h}<br>%{{y}} → %{{x}}: %{{z:.3f}}<extra></extra>",
                showscale=h == 0,
                colorbar={"title": {"text": "attention", "side": "right"}, "thickness": 10},
            )
        )
    fig = go.Figure(traces, layout)
    title = f"all {n_heads} heads of layer {layer}: query rows {window_start}–"
    title += f"{window_start + rows - 1} × keys 0–{n_keys - 1} (click a head to open it)"
    return apply_style(fig, height=int(panel * grid_rows) + 90, title=title)


def logit_attribution_bars(
    values: np.ndarray, labels: Sequence[str], hover: Sequence[str], *, title: str
) -> go.Figure:
    """A head's direct logit attribution along the prompt (``values: [seq]``, one bar per
    position: what the head adds to the logit of the token that comes next there); ``hover``
    says per position what else the head promotes."""
    values = np.asarray(values, dtype=float)
    if not len(values) == len(labels) == len(hover):
        raise ShapeError(
            f"{len(values)} values, {len(labels)} labels and {len(hover)} hover texts differ"
        )
    colours = np.where(values >= 0, EFFECT_COLOURS[0], "#2c7fb8")
    fig = go.Figure(
        go.Bar(
            x=list(range(len(values))),
            y=values,
            marker_color=colours,
            customdata=np.asarray(hover, dtype=object),
            hovertemplate="%{customdata}<extra></extra>",
        )
    )
    step = max(1, int(np.ceil(len(labels) / 64)))
    fig.update_xaxes(
        tickmode="array",
        tickvals=list(range(0, len(labels), step)),
        ticktext=list(labels)[::step],
        tickangle=-60,
        tickfont={"size": 10},
        title_text="position (the bar: logit of the next token)",
    )
    fig.update_yaxes(title_text="direct logit attribution", zeroline=True)
    fig.add_hline(y=0, line={"color": "#adb5bd", "width": 1})
    return apply_style(fig, height=340, title=title)


def sweep_heatmap(
    info: ModelInfo, values: np.ndarray, metric: str, *, title: str | None = None
) -> go.Figure:
    """Layer × head grid of a per-head ablation sweep (``values: [n_layers, n_heads]``, the
    metric's change with − without when that head alone is intervened on; NaN = not swept).

    A diverging scale centred on 0 whose bound is the largest change, so the head that matters
    most is the darkest cell and the sign reads as red (up) or blue (down).
    """
    values = np.asarray(values, dtype=float)  # [n_layers, n_heads]
    if values.shape != (info.n_layers, info.n_heads):
        raise ShapeError(
            f"sweep of {metric!r} must be [n_layers, n_heads] = "
            f"{(info.n_layers, info.n_heads)}, got {values.shape}"
        )
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    fig = go.Figure(
        _grid_trace(
            info,
            values,
            f"{metric} change",
            ColourScale(DIFF_SCALE, -bound, bound),
            hovertemplate="%{text} = %{z:+.4f}<extra></extra>",
            colorbar={"title": {"text": f"Δ {metric}", "side": "right"}, "thickness": 14},
        )
    )
    _kv_decorations(fig, info)
    _grid_axes(fig, info)
    return apply_style(fig, height=grid_height(info.n_layers), title=title)


CIRCUIT_CLASS_COLOURS = {
    "name mover": "#1f77b4",
    "negative name mover": "#d62728",
    "backup name mover": "#aec7e8",
    "s-inhibition": "#ff7f0e",
    "induction": "#2ca02c",
    "duplicate token": "#9467bd",
    "previous token": "#8c564b",
    "other": "#7f7f7f",
    "negative": "#e377c2",
    "ambiguous": "#bcbd22",
}
PATH_COLOURS = {"q": "#e67e22", "k": "#8e44ad", "v": "#16a085", "direct": "#2c3e50"}
NOT_IN_CIRCUIT = "not in the circuit"


def class_heatmap(
    info: ModelInfo, classes: dict[tuple[int, int], str], name: str = "circuit"
) -> go.Figure:
    """Layer × head grid coloured by each head's circuit class (``classes``: ``(layer, head)``
    -> class; other heads light grey), one legend entry per class present."""
    present = [c for c in CIRCUIT_CLASS_COLOURS if c in set(classes.values())]
    present += sorted(set(classes.values()) - set(present))
    codes = {c: i + 1 for i, c in enumerate(present)}  # 0: not in the circuit
    z = np.zeros((info.n_layers, info.n_heads))
    text = np.full((info.n_layers, info.n_heads), NOT_IN_CIRCUIT, dtype=object)
    for (layer, head), role in classes.items():
        z[layer, head] = codes[role]
        text[layer, head] = role
    colours = [LABEL_COLOURS[0]] + [CIRCUIT_CLASS_COLOURS.get(c, "#495057") for c in present]
    n = len(colours)
    # a stepped scale: code i covers [i / n, (i + 1) / n) of the range
    scale = [[edge, c] for i, c in enumerate(colours) for edge in (i / n, (i + 1) / n)]
    fig = go.Figure(
        _grid_trace(
            info,
            z,
            name,
            ColourScale(scale, -0.5, n - 0.5),
            customdata=text,
            hovertemplate="%{text}: %{customdata}<extra></extra>",
            showscale=False,
        )
    )
    for role in present:  # legend entries (the heatmap itself has none)
        fig.add_trace(
            go.Scatter(
                x=[None],  # no point: plotly lists a trace without data in no legend
                y=[None],
                mode="markers",
                name=role,
                marker={"symbol": "square", "size": 11, "color": CIRCUIT_CLASS_COLOURS.get(role)},
            )
        )
    _kv_decorations(fig, info)
    _grid_axes(fig, info)
    # the legend above the grid, right-aligned: below it would sit on the axis title
    fig.update_layout(
        legend={"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 1, "xanchor": "right"}
    )
    title = f"{name}: {len(classes)} of {z.size} heads in {len(present)} classes"
    return apply_style(fig, height=grid_height(info.n_layers) + 40, title=title)


def circuit_graph(heads: Sequence, edges: Sequence, *, title: str) -> go.Figure:
    """A circuit as a directed graph: one node per head at (its head index, its layer), so the
    heads of a layer never overlap; the logits above the last layer; one arrow per path,
    coloured by the path it acts through (q, k, v or direct) and as wide as its effect.

    ``heads``: items with ``layer``, ``head``, ``role`` and ``evidence`` (a dict; ``dla`` and
    ``end_io`` are shown in the hover), e.g. :class:`interventions.circuit.CircuitHead`;
    ``edges``: items with ``sender``, ``receiver`` (``"layer.head"`` or ``"logits"``), ``via``
    and ``effect`` (None when not measured). Nodes carry ``customdata`` ``(layer, head)``;
    each arrow's hover (sender → receiver, path, effect) sits at its midpoint.
    """
    xy = {f"{h.layer}.{h.head}": (float(h.head), float(h.layer)) for h in heads}
    layers = sorted({h.layer for h in heads})
    top = (layers[-1] if layers else 0) + 1.5
    xs = [x for x, _ in xy.values()] or [0.0]
    xy["logits"] = ((min(xs) + max(xs)) / 2, top)
    shown = [e for e in edges if e.sender in xy and e.receiver in xy]
    largest = max((abs(e.effect) for e in shown if e.effect is not None), default=0.0) or 1.0
    offsets = {"q": -0.1, "k": 0.0, "v": 0.1, "direct": 0.0}  # paths into one head apart
    fig = go.Figure()
    arrows = []
    for via in PATH_COLOURS:  # one hover trace per path kind: its legend entry and colour
        mine = [e for e in shown if e.via == via]
        if not mine:
            continue
        mid_x, mid_y, hover = [], [], []
        for e in mine:
            (x0, y0), (x1, y1) = xy[e.sender], xy[e.receiver]
            x1 += offsets.get(via, 0.0) if e.receiver != "logits" else 0.0
            width = 1.0 if e.effect is None else 1.0 + 5.0 * abs(e.effect) / largest
            arrows.append(
                {
                    "x": x1,
                    "y": y1 - 0.22,  # the tip stops short of the node
                    "ax": x0,
                    "ay": y0 + 0.22,
                    "xref": "x",
                    "yref": "y",
                    "axref": "x",
                    "ayref": "y",
                    "showarrow": True,
                    "arrowhead": 2,
                    "arrowsize": 1.0,
                    "arrowwidth": width,
                    "arrowcolor": PATH_COLOURS[via],
                    "opacity": 0.75,
                    "text": "",
                }
            )
            mid_x.append((x0 + x1) / 2)
            mid_y.append((y0 + y1) / 2)
            effect = "not measured" if e.effect is None else f"{e.effect:+.3f}"
            hover.append(f"{e.sender} → {e.receiver} via {via}: effect {effect}")
        fig.add_trace(
            go.Scatter(
                x=mid_x,
                y=mid_y,
                mode="markers",
                name=f"{via} path" if via != "direct" else "direct to logits",
                text=hover,
                hovertemplate="%{text}<extra></extra>",
                marker={"size": 9, "color": PATH_COLOURS[via], "symbol": "diamond"},
            )
        )
    for role in [
        *CIRCUIT_CLASS_COLOURS,
        *sorted({h.role for h in heads} - set(CIRCUIT_CLASS_COLOURS)),
    ]:
        members = [h for h in heads if h.role == role]
        if not members:
            continue
        fig.add_trace(
            go.Scatter(
                x=[float(h.head) for h in members],
                y=[float(h.layer) for h in members],
                mode="markers+text",
                name=role,
                text=[f"{h.layer}.{h.head}" for h in members],
                textposition="middle right",
                marker={"size": 16, "color": CIRCUIT_CLASS_COLOURS.get(role, "#495057")},
                customdata=[[h.layer, h.head] for h in members],
                hovertext=[
                    f"{h.layer}.{h.head} {role}<br>DLA {_number(h.evidence.get('dla'))}<br>"
                    f"END→IO attention {_number(h.evidence.get('end_io'))}"
                    for h in members
                ],
                hoverinfo="text",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[xy["logits"][0]],
            y=[top],
            mode="markers+text",
            text=["logits"],
            textposition="middle right",
            name="logits",
            marker={"size": 18, "color": "black", "symbol": "square"},
        )
    )
    fig.update_layout(annotations=arrows, legend={"orientation": "h", "y": -0.12})
    columns = sorted({h.head for h in heads})
    fig.update_xaxes(
        title_text="head",
        tickmode="array",
        tickvals=columns,
        range=[min(xs) - 0.8, max(xs) + 1.2],
        zeroline=False,
        showgrid=False,
    )
    fig.update_yaxes(
        title_text="layer",
        tickmode="array",
        tickvals=layers,
        ticktext=[str(layer) for layer in layers],
        range=[(layers[0] if layers else 0) - 0.7, top + 0.7],
        zeroline=False,
    )
    span = (layers[-1] - layers[0] + 2) if layers else 2  # layers drawn, and the logits
    return apply_style(fig, height=int(min(1400, max(460, 60 * span + 220))), title=title)


def _number(value: object) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"
