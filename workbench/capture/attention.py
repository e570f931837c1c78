"""The attention-function swap: one way to run a transformers model with the workbench's attention.

Recording statistics (:mod:`workbench.capture.streamed`), intervening on heads at any length
(:mod:`interventions.streamed`) and simulating a KV-cache policy (:mod:`workbench.kv_policy`) all
work the same way: a function is registered in transformers' ``AttentionInterface`` under a name
of the workbench, the model's attention implementation is switched to that name for the
duration of a ``with`` block, and every attention layer then calls it with post-RoPE

    query [batch, n_heads, q_len, d_qk]   key [batch, n_kv_heads, k_len, d_qk]
    value [batch, n_kv_heads, k_len, d_v]

This module owns that mechanism:

* :func:`parse_call` turns what transformers hands an attention function (the module, q/k/v,
  the mask, ``scaling``, ``dropout`` and keyword arguments such as ``sliding_window``,
  ``softcap``, ``s_aux``) into one :class:`AttentionCall`: causal or bidirectional, key padding,
  local window, chunk size, logit softcap and learned sink logits, exactly as the model's own
  eager attention would apply them. What the kernels cannot reproduce is refused here, once,
  with a :class:`~workbench.errors.CaptureError`, never answered with other numbers.
* :func:`key_mask` is the companion ``AttentionMaskInterface`` function. Instead of an L×L mask
  it hands the attention function a :class:`KeyMask`: the 2D key padding mask plus the local
  window or chunk size that the model's mask function describes (read off the mask function
  itself, so a Mistral, Gemma 2 local layer, Llama 4 chunked layer or ModernBERT local layer is
  recognised by what it masks, not by its class name).
* :func:`register` adds a workbench attention function under a name; :func:`use_attention` is
  the context manager that switches a model to it and restores every config afterwards.
* :func:`attend` computes a layer's output for an :class:`AttentionCall`: SDPA where SDPA needs
  no materialised mask, the fused kernel (`kernels.attention_stats` with ``return_output``)
  otherwise, so that no L×L tensor is formed for any variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
)

from kernels import attention_stats
from workbench.errors import CaptureError

__all__ = [
    "AttentionCall",
    "AttentionFunction",
    "KeyMask",
    "attend",
    "key_mask",
    "parse_call",
    "register",
    "use_attention",
]

# A workbench attention function: one parsed call in, the layer's output
# ``[batch, n_heads, q_len, d_v]`` out.
AttentionFunction = Callable[["AttentionCall"], Tensor]


@dataclass(frozen=True)
class KeyMask:
    """What :func:`key_mask` hands the attention function instead of an L×L mask.

    ``padding [batch, k_len]`` bool (True = real token) or None; ``window``: the query at
    position p sees only keys j with |p - j| < window (and j <= p when causal; transformers'
    ``sliding_window`` w is window w for causal layers and window w + 1 for bidirectional ones,
    whose mask keeps |p - j| <= w), None for no window; ``chunk``: keys of the query's own
    chunk of ``chunk`` positions only (Llama 4), None for no chunks. ``offset``: the absolute
    position of the first key handed over, > 0 when the KV cache keeps only a sliding window's
    last keys (transformers' ``DynamicSlidingWindowLayer``, the default cache of Mistral and
    Gemma 2/3 while generating).
    """

    padding: Tensor | None = None
    window: int | None = None
    chunk: int | None = None
    offset: int = 0


@dataclass(frozen=True)
class AttentionCall:
    """One attention layer's call, normalised.

    Shapes: ``query [batch, n_heads, q_len, d_qk]``, ``key [batch, n_kv_heads, k_len, d_qk]``,
    ``value [batch, n_kv_heads, k_len, d_v]``; the query rows are the last ``q_len`` key
    positions (KV-cache convention). ``key_offset``: the absolute position of key 0 (> 0 when a
    sliding-window cache dropped the earliest keys, see :class:`KeyMask`), so that query row
    ``i`` sits at ``key_offset + k_len - q_len + i``; the kernels work in the call's own key
    indices, which masks, windows and chunks do not depend on, but key positions that mean
    something absolute (sinks, spans, ``q_positions``) must be shifted by it.
    ``padding [batch, k_len]`` bool or None. ``sinks
    [n_heads]``: learned sink logits (gpt-oss ``s_aux``), one extra softmax slot per head with
    no value. ``window``/``chunk`` as in :class:`KeyMask`; ``softcap`` c maps each scaled score
    s to c·tanh(s/c) before the softmax.
    """

    module: torch.nn.Module
    layer: int | None  # the module's ``layer_idx``; None for modules that do not carry one
    query: Tensor
    key: Tensor
    value: Tensor
    causal: bool
    scale: float
    dropout: float = 0.0
    padding: Tensor | None = None
    window: int | None = None
    chunk: int | None = None
    softcap: float | None = None
    sinks: Tensor | None = None
    key_offset: int = 0

    @property
    def plain(self) -> bool:
        """No window, chunk, softcap or learned sinks: attention SDPA computes as it is."""
        return (
            self.window is None
            and self.chunk is None
            and self.softcap is None
            and (self.sinks is None)
        )

    def kernel_options(self) -> dict[str, Any]:
        """Keyword arguments of `kernels.attention_stats` / `kernels.received_attention` that
        make the kernels see exactly the keys and scores this layer sees."""
        options: dict[str, Any] = dict(
            causal=self.causal, scale=self.scale, key_padding_mask=self.padding
        )
        for name in ("window", "chunk", "softcap", "sinks"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options

    def with_tensors(self, **tensors: Tensor | None) -> AttentionCall:
        """The same call with some of query/key/value/padding/sinks replaced (e.g. a subset of
        heads)."""
        return replace(self, **tensors)


def parse_call(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: KeyMask | Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> AttentionCall:
    """The :class:`AttentionCall` of what transformers handed an attention function; raises
    `CaptureError` for what the workbench's kernels cannot reproduce."""
    name = type(module).__name__
    if kwargs.get("position_bias") is not None:
        raise CaptureError(
            f"{name} adds a position bias to its attention scores (ALiBi-style); the streamed "
            "path does not take it: use the pattern path (path='pattern')"
        )
    if isinstance(attention_mask, Tensor):
        raise CaptureError(
            f"{name} received a {attention_mask.ndim}D attention mask made outside the "
            "workbench's mask function; the streamed path takes causal, bidirectional, local and "
            "chunked attention with key padding only"
        )
    mask = attention_mask or KeyMask()
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    window = mask.window
    argument_window = kwargs.get("sliding_window")
    if window is None and isinstance(argument_window, int) and argument_window < key.shape[2]:
        # the model hands the window to attention but made a plain mask: trust neither silently
        raise CaptureError(
            f"{name} passes sliding_window={argument_window} but its mask function is plain; "
            "the streamed path cannot tell which keys it sees"
        )
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if sinks is not None:
        sinks = sinks.reshape(-1)
        if sinks.numel() != query.shape[1]:
            raise CaptureError(
                f"{name}: learned sink logits must be [n_heads={query.shape[1]}], got "
                f"{tuple(sinks.shape)}"
            )
    layer = getattr(module, "layer_idx", None)
    return AttentionCall(
        module=module,
        layer=None if layer is None else int(layer),
        query=query,
        key=key,
        value=value,
        causal=causal,
        scale=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
        dropout=float(dropout),
        padding=mask.padding,
        window=window,
        chunk=mask.chunk,
        softcap=None if softcap is None else float(softcap),
        sinks=sinks,
        key_offset=mask.offset,
    )


def needs_kernel_output(call: AttentionCall) -> bool:
    """True when SDPA could give this layer's output only with a materialised mask (padding,
    a partial-prefill query block under a causal mask, or any variant): the fused kernel then
    gives the output instead. The kernel has no dropout, so that combination is refused."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    kernel = call.padding is not None or not call.plain or (call.causal and 1 < q_len < k_len)
    if kernel and call.dropout > 0:
        raise CaptureError(
            "attention dropout together with padding or an attention variant is not supported "
            "on the streamed path; call model.eval()"
        )
    return kernel


def attend(call: AttentionCall) -> Tensor:
    """The layer's attention output ``[batch, n_heads, q_len, d_v]``, as eager attention gives
    it, without an L×L tensor: SDPA for plain attention, the fused kernel for the rest."""
    if needs_kernel_output(call):
        return attention_stats(
            call.query, call.key, call.value, return_output=True, **call.kernel_options()
        ).output
    q_len = call.query.shape[2]
    key, value = call.key, call.value
    group = call.query.shape[1] // key.shape[1]
    if group > 1 and call.query.dtype == torch.float32:
        # only the flash backend (16-bit) reads grouped K/V; an fp32 call with enable_gqa falls
        # back to the math backend's [batch, heads, L, L] scores (133 GiB for SmolLM2's 56 rows
        # at 8K on the H200), so repeat the KV heads as Hugging Face's repeat_kv does
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(
        call.query, key, value, dropout_p=call.dropout, scale=call.scale,
        is_causal=call.causal and q_len > 1, enable_gqa=call.query.shape[1] != key.shape[1],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The mask function registered next to every workbench attention function.


def key_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> KeyMask | None:
    """``AttentionMaskInterface`` function: a :class:`KeyMask` (None when the attention is plain,
    nothing is padded and the keys start at position 0).

    transformers builds every mask from an index function ``mask_function(batch, head, q, kv)``;
    ``local_size`` is set for local and chunked masks. Plain causal and bidirectional masks are
    recognised by identity; a local or chunked one by evaluating it on a few rows around the
    window (:func:`_local_structure`). Packed sequences, vision blocks and other custom masks are
    refused.
    """
    if use_vmap:
        raise CaptureError(
            "this model asked for a custom attention mask (packed sequences, image blocks or an "
            "extra mask function); the streamed path takes causal, bidirectional, local and "
            "chunked attention with key padding"
        )
    padding = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise CaptureError(f"expected a 2D padding mask, got {attention_mask.ndim}D")
        padding = attention_mask.bool()[:, kv_offset : kv_offset + kv_length]
        if padding.shape[1] < kv_length:  # keys beyond the given mask are real (a static cache)
            padding = F.pad(padding, (0, kv_length - padding.shape[1]), value=True)
        padding = None if bool(padding.all()) else padding.expand(batch_size, -1)
    window = chunk = None
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        if local_size is None:
            raise CaptureError(
                "this model asked for a custom attention mask function; the streamed path takes "
                "causal, bidirectional, local and chunked attention with key padding"
            )
        if kv_offset + kv_length > local_size or q_offset + q_length > local_size:
            # chunks start at each sequence's first real token (transformers' chunked_overlay)
            starts = [0] * batch_size
            if padding is not None:
                starts = padding.int().argmax(-1).tolist()  # leading padding keys per row
            window, chunk = _local_structure(mask_function, local_size, starts)
    if chunk is not None and kv_offset:
        raise CaptureError(
            "this chunked-attention layer's KV cache dropped its first keys (transformers' "
            "sliding-window cache), so where its chunks start among the cached keys is unknown; "
            "generate with past_key_values=DynamicCache(), which keeps every key"
        )
    if padding is None and window is None and chunk is None and not kv_offset:
        return None
    return KeyMask(padding=padding, window=window, chunk=chunk, offset=kv_offset)


def _local_structure(
    mask_function: Callable, local_size: int, starts: list[int]
) -> tuple[int | None, int | None]:
    """``(window, chunk)`` of a local or chunked mask function, read off its values on query rows
    around the window edge (keys up to 2·local_size + 2 past each row's ``starts[b]``, its
    leading padding): a causal local window of ``local_size`` (Mistral, Gemma 2/3, gpt-oss,
    Cohere2), a bidirectional one (ModernBERT), or causal chunks starting at each row's first
    real token (Llama 4). Anything else raises `CaptureError`."""
    for b, start in enumerate(starts):
        n = start + 2 * local_size + 3
        rows = torch.tensor(sorted({start + r for r in (0, 1, local_size - 1, local_size)}
                                   | {start + local_size + 1, n - 1}))  # fmt: skip
        q = rows[:, None]  # [rows, 1] absolute query positions
        kv = torch.arange(n)[None]  # [1, n] absolute key positions
        candidates = {
            ("window", True): (kv <= q) & (kv > q - local_size),
            ("window", False): (q - kv).abs() <= local_size,
            ("chunk", True): (kv <= q) & ((kv - start) // local_size == (q - start) // local_size),
        }
        try:
            got = torch.as_tensor(
                mask_function(torch.tensor(b), torch.tensor(0), q, kv), dtype=torch.bool
            ).expand(len(rows), n)  # [rows, n] bool
        except Exception as error:  # a mask function that is not index-based
            raise CaptureError(
                f"this model's attention mask function cannot be read by index ({error}); use "
                "the pattern path"
            ) from error
        kinds = {kind for kind, expected in candidates.items() if torch.equal(got, expected)}
        if b == 0:
            found = kinds
        found &= kinds
    if found:  # a window of 1 and chunks of 1 are the same mask: prefer the window
        kind, causal = min(found, key=lambda found_kind: found_kind[0] == "chunk")
        if kind == "chunk":
            return None, local_size
        return (local_size if causal else local_size + 1), None
    raise CaptureError(
        f"this model's local attention mask (local_size={local_size}) is neither a sliding window "
        "nor chunks of that size; use the pattern path"
    )


# ---------------------------------------------------------------------------------------------
# Registration and the swap itself.


def register(name: str, function: AttentionFunction) -> None:
    """Register ``function`` in transformers' ``AttentionInterface`` (and :func:`key_mask` in
    ``AttentionMaskInterface``) under ``name`` (idempotent)."""

    def attention_forward(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: KeyMask | Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        call = parse_call(module, query, key, value, attention_mask, scaling, dropout, kwargs)
        output = function(call)  # [batch, n_heads, q_len, d_v]
        return output.transpose(1, 2).contiguous(), None

    attention_forward.__name__ = f"{name}_attention_forward"
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, key_mask)


@contextlib.contextmanager
def use_attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` (a transformers ``PreTrainedModel``) with the attention function registered
    under ``name`` inside the block; every config's implementation is restored afterwards."""
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
    model.set_attn_implementation(name)
    try:
        if model.config._attn_implementation != name:  # transformers only warned
            raise CaptureError(
                f"{type(model).__name__} computes attention itself instead of calling "
                "transformers' AttentionInterface, so the streamed path cannot run it; use the "
                "pattern path (path='pattern')"
            )
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every config object whose attention implementation ``set_attn_implementation`` may
    change: the model's, its sub-configs' (any depth) and every submodule's."""
    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if hasattr(m, "config")]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen or not hasattr(config, "sub_configs"):
            continue
        seen[id(config)] = config
        stack.extend(getattr(config, key, None) for key in config.sub_configs)
    return list(seen.values())
