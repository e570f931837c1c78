"""Shared capture helpers of the probes, and the ``basic`` measurement.

``basic``: per-head statistics of the scan's own prompts from the capture layer (first-token mass,
entropy, normalised entropy, max probability; see :data:`workbench.capture.STATISTICS`). Several
probes read it; it is computed once per scan.

The helpers run one prompt on either capture path (see :mod:`workbench.capture`):

* :func:`run_with_patterns` -- the pattern path: TransformerLens ``TransformerBridge`` hooks
  ``blocks.{l}.attn.hook_pattern`` (``[batch, head, q_pos, k_pos]``), reduced inside the hook so
  that only one layer's L×L exists at a time;
* :func:`run_streamed` -- the streamed path: the Hugging Face model under a
  :class:`workbench.streamed.StreamedRecorder`, kernel statistics only, no L×L;
* :func:`choose_path` -- which of the two a prompt of a given length takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from workbench.capture import PATTERN_PATH_MAX_TOKENS, STATISTICS, head_statistics
from workbench.models import Model
from workbench.probe import Measurement, ScanContext
from workbench.streamed import StreamedRecorder

BASIC = "basic"
PATHS = ("auto", "pattern", "streamed")


def choose_path(path: str, n_tokens: int) -> str:
    """``"pattern"`` or ``"streamed"``: ``path`` itself, or by length for ``"auto"`` (pattern up
    to :data:`workbench.capture.PATTERN_PATH_MAX_TOKENS` tokens)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
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


def basic_measurement(ctx: ScanContext) -> Measurement:
    token_ids = ctx.token_ids()
    return Measurement(
        key=BASIC,
        texts=list(ctx.prompts.texts),
        token_ids=token_ids,
        definitions=dict(STATISTICS),
        measure=lambda i: head_statistics(ctx.model, torch.as_tensor(token_ids[i]), path=ctx.path),
    )


def decode(tokenizer: Any, token_ids: np.ndarray) -> str:
    """The text of ``token_ids`` for the run file's ``texts`` (NUL characters, which random
    tokens can decode to and HDF5 strings cannot hold, become U+FFFD)."""
    return tokenizer.decode(token_ids).replace("\x00", "\ufffd")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of a (possibly GPU) tensor."""
    return t.detach().float().cpu().numpy()
