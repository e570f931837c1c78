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

from dataclasses import dataclass

import numpy as np
import torch

from kernels import AttentionStats, stats_from_pattern
from kernels.reference import key_range
from workbench.capture.paths import resolve_path, run_with_patterns
from workbench.capture.streamed import StreamedRecorder
from workbench.errors import ShapeError
from workbench.models import Model

STATISTICS: dict[str, str] = {
    "first_token_mass": "mean over the queries i that can see the first token of A[i, 0] (all "
    "queries of a global layer; those inside the window or first chunk of a local one)",
    "entropy": "mean over queries i of -sum_j A[i, j] log A[i, j] (nats)",
    "normalized_entropy": "mean over queries i with >= 2 visible keys of entropy_i / log(visible "
    "keys); Guo et al.'s row-normalised entropy (1 = uniform, 0 = one key)",
    "max_prob": "mean over queries i of max_j A[i, j]",
    "learned_sink_mass": "mean over queries i of the probability on the head's learned sink logit "
    "(gpt-oss s_aux; 1 - sum_j A[i, j]); 0 for models without one",
}


@dataclass(frozen=True)
class QueryLayout:
    """Which keys each query of one layer sees: ``visible [q_pos]`` (how many keys),
    ``sees_first [q_pos]`` (whether the first key is among them) and ``seen_by [k_pos]`` (how
    many queries see each key). Global causal layers see ``i + 1`` keys and always the first;
    local and chunked layers fewer."""

    visible: torch.Tensor  # [q_pos] float32
    sees_first: torch.Tensor  # [q_pos] bool
    seen_by: torch.Tensor  # [k_pos] float32

    @classmethod
    def from_mask(
        cls, q_len: int, *, causal: bool, window: int | None = None, chunk: int | None = None
    ) -> QueryLayout:
        """The layout of a mask (as in :class:`workbench.capture.attention.KeyMask`): each
        query's visible keys are one interval (`kernels.reference.key_range`), so this is O(L)."""
        first, end = key_range(
            torch.arange(q_len), q_len, causal=causal, window=window, chunk=chunk
        )  # [1, q_len] each, both non-decreasing in the position
        first, end = first[0], end[0]
        keys = torch.arange(q_len)
        # queries that see key k: those whose interval starts at or before k, minus those whose
        # interval ends at or before k (both counts by binary search on the sorted bounds)
        seen_by = torch.searchsorted(first, keys, right=True) - torch.searchsorted(
            end, keys, right=True
        )
        return cls(
            visible=(end - first).clamp(min=0).float(),
            sees_first=first == 0,
            seen_by=seen_by.float(),
        )

    @classmethod
    def from_pattern(cls, pattern: torch.Tensor) -> QueryLayout:
        """The layout a materialised pattern ``[head, q_pos, k_pos]`` shows: masked keys have
        probability exactly 0 in every head (a visible key underflows to 0 in no realistic head,
        let alone in all heads of a layer at once)."""
        seen = (pattern > 0).any(0)  # [q_pos, k_pos]
        return cls(
            visible=seen.sum(-1).float().cpu(),
            sees_first=seen[:, 0].cpu(),
            seen_by=seen.sum(0).float().cpu(),
        )


def reduce_stats(stats: AttentionStats, layout: QueryLayout) -> dict[str, torch.Tensor]:
    """Per-query statistics of one layer -> per-head prompt statistics ``{name: [batch, head]}``.

    ``stats`` fields are ``[batch, head, q_pos]`` over all positions of the prompt; ``layout``
    says which keys each query sees.
    """
    entropy = stats.entropy.float()  # [batch, head, q_pos]
    visible = layout.visible.to(entropy.device)  # [q_pos]
    informative = visible > 1  # log(1) = 0: a single visible key carries no entropy information
    if informative.any():
        normalized = (entropy[..., informative] / visible[informative].log()).mean(-1)
    else:
        normalized = torch.zeros(entropy.shape[:-1], device=entropy.device)
    learned = stats.learned_sink_mass
    return {
        "first_token_mass": stats.sink_mass.float()[..., layout.sees_first.to(entropy.device)].mean(
            -1
        ),
        "entropy": entropy.mean(-1),
        "normalized_entropy": normalized,
        "max_prob": stats.max_prob.float().mean(-1),
        "learned_sink_mass": torch.zeros_like(entropy[..., 0])
        if learned is None
        else learned.float().mean(-1),
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
    learned_sinks = model.learned_sinks  # eager attention drops the sink's column

    def record(layer: int, pattern: torch.Tensor) -> None:  # pattern: [head, q_pos, k_pos]
        stats = stats_from_pattern(pattern[None], sink_size=1, learned_sinks=learned_sinks)
        reduced = reduce_stats(stats, QueryLayout.from_pattern(pattern))
        per_layer[layer] = {name: value.cpu() for name, value in reduced.items()}

    run_with_patterns(model, token_ids, record)
    return per_layer


def _streamed_path(model: Model, token_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    per_layer: dict[int, dict[str, torch.Tensor]] = {}

    def record(layer: int, stats: AttentionStats, _received: None) -> None:
        # reduced as each layer arrives: host memory holds one layer's per-query statistics
        mask = recorder.masks[layer]
        layout = QueryLayout.from_mask(
            token_ids.numel(), causal=model.info.causal, window=mask.window, chunk=mask.chunk
        )
        per_layer[layer] = reduce_stats(stats, layout)

    recorder = StreamedRecorder(model.hf, sink_size=1, on_layer=record)
    with recorder:
        model.hf(token_ids[None].to(model.device))
    missing = [layer for layer in range(model.info.n_layers) if layer not in per_layer]
    if missing:
        raise RuntimeError(
            f"the streamed attention function did not run for layers {missing}: the model's "
            "attention does not dispatch through transformers' AttentionInterface"
        )
    return [per_layer[layer] for layer in range(model.info.n_layers)]
