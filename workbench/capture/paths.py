"""The two capture paths and the one rule that picks between them.

* ``"pattern"``: TransformerLens hooks hand over each layer's attention pattern
  ``[batch, head, q_pos, k_pos]``; exact and flexible, but L×L floats per head and layer.
  :func:`run_with_patterns` runs one prompt and hands each layer's pattern over inside its hook,
  so that only one layer's L×L exists at a time.
* ``"streamed"``: the Hugging Face model runs with the workbench attention function and the
  kernels reduce q and k to statistics on the fly; no L×L tensor, any length.
  :func:`run_streamed` runs one prompt under a
  :class:`~workbench.capture.streamed.StreamedRecorder`.
* ``"auto"``: the pattern path up to :data:`PATTERN_PATH_MAX_TOKENS` tokens, streamed beyond.

:func:`resolve_path` is the one place that decides; probes, interventions and the explorer all
call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from workbench.capture.streamed import StreamedRecorder
from workbench.errors import CaptureError
from workbench.models import Model

__all__ = [
    "PATHS",
    "PATTERN_PATH_MAX_TOKENS",
    "layer_of",
    "resolve_path",
    "run_streamed",
    "run_with_patterns",
]

PATHS = ("auto", "pattern", "streamed")

# Above this many tokens the pattern path would hold n_heads x L x L floats per layer.
PATTERN_PATH_MAX_TOKENS = 2048


def resolve_path(path: str, n_tokens: int) -> str:
    """``"pattern"`` or ``"streamed"``: ``path`` itself, or by length for ``"auto"``; raises
    `CaptureError` for any other name."""
    if path not in PATHS:
        raise CaptureError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
    if path == "auto":
        return "pattern" if n_tokens <= PATTERN_PATH_MAX_TOKENS else "streamed"
    return path


def layer_of(hook: Any) -> int:
    """Layer index of a TransformerLens hook named ``blocks.{l}....``."""
    return int(hook.name.split(".")[1])


@torch.no_grad()
def run_with_patterns(
    model: Model,
    token_ids: torch.Tensor,
    on_pattern: Callable[[int, torch.Tensor], None],
    extra: list[tuple[str, Callable]] | None = None,
) -> None:
    """Pattern path: run one prompt ``[seq]`` through the bridge, calling ``on_pattern(layer,
    pattern)`` with each layer's fp32 ``[head, q_pos, k_pos]`` pattern inside its hook.

    ``extra`` are more ``(hook name, fn(tensor, hook))`` pairs (e.g. ``hook_v``).
    """
    bridge = model.bridge()
    seen: set[int] = set()

    def record(pattern: torch.Tensor, hook: Any) -> None:  # [batch, head, q_pos, k_pos]
        seen.add(layer_of(hook))
        on_pattern(layer_of(hook), pattern[0].float())

    hooks = [(f"blocks.{layer}.attn.hook_pattern", record) for layer in range(model.info.n_layers)]
    bridge.run_with_hooks(token_ids[None].to(model.device), fwd_hooks=hooks + (extra or []))
    missing = sorted(set(range(model.info.n_layers)) - seen)
    if missing:
        raise RuntimeError(f"hook_pattern did not fire for layers {missing}")


@torch.no_grad()
def run_streamed(model: Model, token_ids: torch.Tensor, **recorder: Any) -> StreamedRecorder:
    """Streamed path: one forward of the Hugging Face model over ``[seq]`` under a
    :class:`StreamedRecorder` built with ``recorder`` keyword arguments; returns the recorder
    (``.stats`` per layer: fields ``[1, head, q_pos]``, or ``[1, head]`` with ``reduce="mean"``).
    """
    with StreamedRecorder(model.hf, **recorder) as rec:
        model.hf(token_ids[None].to(model.device))
    return rec
