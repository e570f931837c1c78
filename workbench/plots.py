"""One head's attention pattern on a short prompt, as an array and as a labelled figure.

The pattern comes from TransformerLens's ``blocks.{l}.attn.hook_pattern``
(``[batch, head, q_pos, k_pos]``) on the model's bridge, so it is exact and O(L²): use it for
prompts of up to a few hundred tokens. For statistics along positions at any length, use the
streamed path (:class:`workbench.streamed.StreamedRecorder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from workbench.errors import ShapeError
from workbench.models import Model

if TYPE_CHECKING:
    import plotly.graph_objects as go


def token_labels(model: Model, token_ids: np.ndarray) -> list[str]:
    """Readable, unique labels ``"position:token"`` (whitespace made visible)."""
    pieces = model.tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])
    labels = []
    for position, piece in enumerate(pieces):
        text = str(piece).replace("Ġ", "·").replace("▁", "·").replace("Ċ", "↵").replace("\n", "↵")
        text = text if len(text) <= 12 else text[:11] + "…"
        labels.append(f"{position}:{text}")
    return labels


@torch.no_grad()
def head_pattern(model: Model, token_ids: torch.Tensor, layer: int, head: int) -> np.ndarray:
    """``[q_pos, k_pos]`` attention pattern of one head on one prompt (``token_ids: [seq]``)."""
    info = model.info
    if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
        raise ShapeError(
            f"head ({layer}, {head}) is outside the model's {info.n_layers} layers x "
            f"{info.n_heads} heads"
        )
    captured: dict[str, torch.Tensor] = {}

    def record(pattern: torch.Tensor, hook) -> None:  # pattern: [batch, head, q_pos, k_pos]
        captured["pattern"] = pattern[0, head].float().cpu()  # [q_pos, k_pos]

    model.bridge().run_with_hooks(
        token_ids[None].to(model.device),
        fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", record)],
    )
    return captured["pattern"].numpy()


def plot_attention(model: Model, text: str, layer: int, head: int) -> go.Figure:
    """Heatmap of head ``(layer, head)``'s attention on ``text``, tokens on both axes."""
    import plotly.graph_objects as go

    ids = model.tokenize(text)  # [seq]
    pattern = head_pattern(model, ids, layer, head)  # [q_pos, k_pos]
    labels = token_labels(model, ids.numpy())
    fig = go.Figure(
        go.Heatmap(
            z=pattern,
            x=labels,
            y=labels,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>",
        )
    )
    size = min(900, 200 + 18 * len(labels))
    fig.update_layout(
        title=f"{model.info.name} L{layer}H{head}",
        xaxis={"title": "key (attended to)", "tickangle": -60},
        yaxis={"title": "query", "autorange": "reversed"},
        width=size + 100,
        height=size,
    )
    return fig
