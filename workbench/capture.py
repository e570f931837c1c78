"""Capture: per-head attention statistics of one prompt, from whichever path fits its length.

Two paths give the same numbers (a test holds them together):

* **pattern path** (short prompts): TransformerLens hooks ``blocks.{l}.attn.hook_pattern``
  (``[batch, head, q_pos, k_pos]``); each layer's pattern is reduced to statistics inside the hook
  and dropped, so memory stays at one layer's L×L at a time.
* **streamed path** (any length): the Hugging Face model runs with the workbench attention
  function (:mod:`workbench.streamed`), whose kernels compute the statistics from post-RoPE q and
  k without ever forming L×L.

Per query the statistics are those of :class:`kernels.AttentionStats`; a prompt's statistic per
head is their mean over queries, as listed in :data:`STATISTICS`.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels import AttentionStats, stats_from_pattern
from workbench.errors import ShapeError
from workbench.models import Model

# Above this many tokens the pattern path would hold n_heads x L x L floats per layer.
PATTERN_PATH_MAX_TOKENS = 2048

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
    if path == "auto":
        path = "pattern" if token_ids.numel() <= PATTERN_PATH_MAX_TOKENS else "streamed"
    if path == "pattern":
        per_layer = _pattern_path(model, token_ids)
    elif path == "streamed":
        per_layer = _streamed_path(model, token_ids)
    else:
        raise ValueError(f"path must be 'auto', 'pattern' or 'streamed', got {path!r}")
    return {
        name: torch.stack([layer[name][0] for layer in per_layer]).numpy().astype(np.float32)
        for name in STATISTICS
    }


def _pattern_path(model: Model, token_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    bridge = model.bridge()
    per_layer: list[dict[str, torch.Tensor] | None] = [None] * model.info.n_layers

    def record(pattern: torch.Tensor, hook) -> None:  # pattern: [batch, head, q_pos, k_pos]
        layer = int(hook.name.split(".")[1])
        stats = stats_from_pattern(pattern.float(), sink_size=1)
        per_layer[layer] = {
            k: v.cpu() for k, v in reduce_stats(stats, causal=model.info.causal).items()
        }

    hooks = [(f"blocks.{layer}.attn.hook_pattern", record) for layer in range(model.info.n_layers)]
    bridge.run_with_hooks(token_ids[None].to(model.device), fwd_hooks=hooks)
    missing = [layer for layer, stats in enumerate(per_layer) if stats is None]
    if missing:
        raise RuntimeError(f"hook_pattern did not fire for layers {missing}")
    return per_layer  # type: ignore[return-value]


def _streamed_path(model: Model, token_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    from workbench.streamed import StreamedRecorder

    per_layer: dict[int, dict[str, torch.Tensor]] = {}

    def record(layer: int, stats: AttentionStats, _received: None) -> None:
        # reduced as each layer arrives: host memory holds one layer's per-query statistics
        per_layer[layer] = reduce_stats(stats, causal=model.info.causal)

    with StreamedRecorder(model.hf, sink_size=1, on_layer=record):
        model.hf(token_ids[None].to(model.device))
    missing = [layer for layer in range(model.info.n_layers) if layer not in per_layer]
    if missing:
        raise RuntimeError(
            f"the streamed attention function did not run for layers {missing}: the model's "
            "attention does not dispatch through transformers' AttentionInterface"
        )
    return [per_layer[layer] for layer in range(model.info.n_layers)]
