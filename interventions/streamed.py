"""The long path: interventions inside an ``AttentionInterface`` attention function.

:data:`ATTENTION_NAME` is registered with transformers next to the workbench's streamed
capture function (:mod:`workbench.streamed`). Each attention layer hands it post-RoPE
``query [batch, n_heads, q_len, d]`` and ``key/value [batch, n_kv_heads, k_len, d]``. Layers
without work go straight to :func:`workbench.streamed.streamed_attention_forward` (SDPA, and
statistics when a ``StreamedRecorder`` is active). A layer with interventions computes its
output with SDPA, replaces the selected heads' output by the closed forms of
:mod:`interventions.ops` (pattern kinds), then applies the output kinds to
``z [batch, q_pos, head, d_head]``, the tensor TransformerLens calls ``hook_z``. No L×L tensor
is formed, so a 32K-token needle test runs with heads ablated or redistributed.

The active plan lives in a context variable set by :class:`interventions.engine.Intervener`;
the model's attention implementation is switched for the duration of one forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.errors import InterventionError
from workbench.streamed import streamed_attention_forward, streamed_mask

__all__ = ["ATTENTION_NAME", "LayerWork", "intervened_attention_forward", "use_attention"]

ATTENTION_NAME = "workbench_intervene"

# LayerWork(layer, module, q, k, v, out, causal, scale) -> new out [batch, q_len, n_heads, d_v]
LayerWork = Callable[[int, torch.nn.Module, Tensor, Tensor, Tensor, Tensor, bool, float], Tensor]

_ACTIVE: ContextVar[tuple[set[int], LayerWork] | None] = ContextVar(
    "workbench_intervene", default=None
)


def intervened_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` function; returns ``(attn_output [batch, q_len, n_heads, d_v],
    None)`` with the active plan's interventions applied."""
    active = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if active is None or layer is None or int(layer) not in active[0]:
        return streamed_attention_forward(
            module, query, key, value, attention_mask, scaling, dropout, **kwargs
        )
    work = active[1]
    for unsupported in ("softcap", "s_aux", "position_bias", "sliding_window"):
        if kwargs.get(unsupported) is not None:
            raise InterventionError(
                f"interventions on the streamed path do not support {unsupported!r} "
                f"({type(module).__name__})"
            )
    if attention_mask is not None:
        raise InterventionError(
            "interventions run on unpadded batches of equal-length prompts; got a padding mask"
        )
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len != k_len:
        raise InterventionError("interventions run without a KV cache (one full forward pass)")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scale, is_causal=causal and q_len > 1,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip  # [batch, n_heads, q_len, d_v]
    z = work(int(layer), module, query, key, value, out, causal, scale)
    return z.contiguous(), None


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, intervened_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, streamed_mask)


@contextlib.contextmanager
def use_attention(hf_model: torch.nn.Module, layers: set[int], work: LayerWork) -> Iterator[None]:
    """Run ``hf_model`` with the intervening attention function; ``work`` handles ``layers``."""
    register()
    saved = [(c, c._attn_implementation_internal) for c in _configs(hf_model)]
    hf_model.set_attn_implementation(ATTENTION_NAME)
    token = _ACTIVE.set((layers, work))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every config (and sub-config, any depth) whose attention implementation
    ``set_attn_implementation`` may change, so that it can be restored afterwards."""
    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if hasattr(m, "config")]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen or not hasattr(config, "sub_configs"):
            continue
        seen[id(config)] = config
        stack.extend(getattr(config, key, None) for key in config.sub_configs)
    return list(seen.values())
