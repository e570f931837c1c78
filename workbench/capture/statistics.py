"""Per-head attention statistics of one prompt, from whichever path fits its length.

Two paths give the same numbers (a test holds them together):

* **pattern path** (short prompts): TransformerLens hooks ``blocks.{l}.attn.hook_pattern``
  (``[batch, head, q_pos, k_pos]``); each layer's pattern is reduced to statistics inside the hook
  and dropped, so memory stays at one layer's L×L at a time.
* **streamed path** (any length): the Hugging Face model runs with the workbench attention
  function (:mod:`workbench.capture.streamed`), whose kernels compute the statistics from
  post-RoPE q and k without ever forming L×L.

Per query the statistics are those of :class:`kernels.AttentionStats`; a prompt's statistic per
head is their mean over queries, as listed in :data:`STATISTICS`.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels import AttentionStats, stats_from_pattern
from workbench.capture.paths import resolve_path, run_streamed, run_with_patterns
from workbench.errors import ShapeError
from workbench.models import Model

STATISTICS: dict[str, str] = {
    "first_token_mass": "mean over queries i of A[i, 0], the attention paid to the first token",
    "entropy": "mean over queries i of -sum_j A[i, j] log A[i, j] (nats)",
    "normalized_entropy": "mean over queries i with >= 2 visible keys of entropy_i / log(visible "
    "keys); Guo et al.'s row-normalised entropy (1 = uniform, 0 = one key)",
    "max_prob": "mean over queries i of max_j A[i, j]",
}


def reduce_stats(stats: AttentionStats, *, causal: bool) -> dict[str, torch.Tensor]:
    """Per-query statistics of one layer -> per-head prompt statistics ``{name: [batch, head]}``.

    ``stats`` fields are ``[batch, head, q_pos]`` over all positions of the prompt.
    """
    entropy = stats.entropy.float()  # [batch, head, q_pos]
    q_len = entropy.shape[-1]
    if causal:
        visible = torch.arange(1, q_len + 1, dtype=torch.float32)  # [q_pos]
    else:
        visible = torch.full((q_len,), float(q_len))
    informative = visible > 1  # log(1) = 0: a single visible key carries no entropy information
    if informative.any():
        normalized = (entropy[..., informative] / visible[informative].log()).mean(-1)
    else:
        normalized = torch.zeros(entropy.shape[:-1])
    return {
        "first_token_mass": stats.sink_mass.float().mean(-1),
        "entropy": entropy.mean(-1),
        "normalized_entropy": normalized,
        "max_prob": stats.max_prob.float().mean(-1),
    }


@torch.no_grad()
def head_statistics(
    model: Model, token_ids: torch.Tensor, *, path: str = "auto"
) -> dict[str, np.ndarray]:
    """Statistics of one prompt: ``{name: [n_layers, n_heads] float32}`` (see :data:`STATISTICS`).

    Args:
        token_ids: ``[seq]`` token ids of one prompt.
        path: ``"pattern"``, ``"streamed"`` or ``"auto"`` (pattern up to
            :data:`PATTERN_PATH_MAX_TOKENS` tokens, streamed beyond).
    """
    if token_ids.ndim != 1 or token_ids.numel() == 0:
        raise ShapeError(
            f"token_ids must be a non-empty [seq] tensor, got {tuple(token_ids.shape)}"
        )
    if resolve_path(path, token_ids.numel()) == "pattern":
        per_layer = _pattern_path(model, token_ids)
    else:
        per_layer = _streamed_path(model, token_ids)
    return {
        name: torch.stack([layer[name][0] for layer in per_layer]).numpy().astype(np.float32)
        for name in STATISTICS
    }


def _pattern_path(model: Model, token_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(model.info.n_layers)]

    def record(layer: int, pattern: torch.Tensor) -> None:  # pattern: [head, q_pos, k_pos]
        stats = stats_from_pattern(pattern[None], sink_size=1)
        per_layer[layer] = {
            name: value.cpu()
            for name, value in reduce_stats(stats, causal=model.info.causal).items()
        }

    run_with_patterns(model, token_ids, record)
    return per_layer


def _streamed_path(model: Model, token_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    per_layer: dict[int, dict[str, torch.Tensor]] = {}

    def record(layer: int, stats: AttentionStats, _received: None) -> None:
        # reduced as each layer arrives: host memory holds one layer's per-query statistics
        per_layer[layer] = reduce_stats(stats, causal=model.info.causal)

    run_streamed(model, token_ids, sink_size=1, on_layer=record)
    missing = [layer for layer in range(model.info.n_layers) if layer not in per_layer]
    if missing:
        raise RuntimeError(
            f"the streamed attention function did not run for layers {missing}: the model's "
            "attention does not dispatch through transformers' AttentionInterface"
        )
    return [per_layer[layer] for layer in range(model.info.n_layers)]
