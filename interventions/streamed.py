"""The long path: interventions inside the workbench's attention function.

The model runs through the attention-function swap of :mod:`workbench.capture.attention` under
:data:`ATTENTION_NAME`. Each attention layer hands over one
:class:`~workbench.capture.attention.AttentionCall` (post-RoPE ``query [batch, n_heads, q_len,
d]``, ``key/value [batch, n_kv_heads, k_len, d]``, the layer's mask, window, chunk, softcap and
learned sinks). Layers without work get the streamed capture path's function (SDPA or the fused
kernel, and statistics when a ``StreamedRecorder`` is active). A layer with interventions
computes its output as the model would (:func:`workbench.capture.attention.attend`), then hands
it to the plan's :data:`LayerWork`, which replaces the selected heads' output by the closed
forms of :mod:`interventions.ops` (pattern kinds) and applies the output kinds to
``z [batch, q_pos, head, d_head]``, the tensor TransformerLens calls ``hook_z``. No L×L tensor is
formed, so a 32K-token needle test runs with heads ablated or redistributed.

The active plan lives in a context variable set by :class:`interventions.engine.Intervener`;
the model's attention implementation is switched for the duration of one forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from workbench.capture.attention import AttentionCall, attend, register, use_attention
from workbench.capture.streamed import streamed_attention
from workbench.errors import InterventionError

__all__ = ["ATTENTION_NAME", "LayerWork", "intervened_attention", "intervening"]

ATTENTION_NAME = "workbench_intervene"

# LayerWork(call, out [batch, n_heads, q_len, d_v]) -> new out [batch, q_len, n_heads, d_v]
LayerWork = Callable[[AttentionCall, Tensor], Tensor]

_ACTIVE: ContextVar[tuple[set[int], LayerWork] | None] = ContextVar(
    "workbench_intervene", default=None
)


def intervened_attention(call: AttentionCall) -> Tensor:
    """The attention function of the active plan: ``[batch, n_heads, q_len, d_v]`` with the
    plan's interventions applied to its layers."""
    active = _ACTIVE.get()
    if active is None or call.layer is None or call.layer not in active[0]:
        return streamed_attention(call)
    if call.padding is not None:
        raise InterventionError(
            "interventions run on unpadded batches of equal-length prompts; got a padding mask"
        )
    if call.query.shape[2] != call.key.shape[2]:
        raise InterventionError("interventions run without a KV cache (one full forward pass)")
    z = active[1](call, attend(call))  # [batch, q_len, n_heads, d_v]
    return z.transpose(1, 2)


register(ATTENTION_NAME, intervened_attention)


@contextlib.contextmanager
def intervening(hf_model: torch.nn.Module, layers: set[int], work: LayerWork) -> Iterator[None]:
    """Run ``hf_model`` with the intervening attention function; ``work`` handles ``layers``."""
    token = _ACTIVE.set((layers, work))
    try:
        with use_attention(hf_model, ATTENTION_NAME):
            yield
    finally:
        _ACTIVE.reset(token)
