"""Streamed capture: per-head attention statistics of a Hugging Face model at any length.

The model runs with an attention function registered in transformers' ``AttentionInterface``
under :data:`ATTENTION_NAME`. Each attention layer hands it post-RoPE ``query [batch, n_heads,
q_len, d]`` and ``key/value [batch, n_kv_heads, k_len, d]``; the function computes the layer's
output with SDPA (or, where SDPA would need a materialised mask, with the stats kernel itself)
and records `kernels.AttentionStats` from the same q and k. Statistics stream layer by layer to
the CPU; no L×L tensor is formed, so GPU memory stays that of a plain forward pass.

Usage::

    with StreamedRecorder(model, sink_size=4, recent_window=256, spans=[[s, e]]) as rec:
        model(input_ids)
    rec.stats          # list over layers of AttentionStats ([batch, n_heads, q] tensors, CPU)
    rec.received       # list over layers of [batch, n_heads, k_len] (with received=True)

    # or hand each layer on as soon as it is computed (e.g. to a run file), keeping nothing:
    StreamedRecorder(model, on_layer=lambda layer, stats, received: ...)

Masks. A companion mask function is registered in ``AttentionMaskInterface`` under the same
name; instead of a 4D mask it hands the attention function the 2D key padding mask
``[batch, k_len]`` (or None when nothing is padded). Causal versus bidirectional comes from the
module's ``is_causal``. Sliding-window and chunked masks are supported only where the window
covers the whole sequence; custom 4D masks and packed sequences are refused with an error
rather than answered with silently wrong statistics.

Queries. With a KV cache the ``q_len`` queries are the last ``q_len`` key positions. The
recorder's ``q_positions`` keeps only the queries at those absolute positions (e.g. the answer
tokens); ``query_mask [batch, q_len]`` selects queries for the received attention and for
``reduce="mean"``, which stores the per-head mean over the selected queries instead of
per-query statistics (``argmax`` is then None).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import AttentionStats, attention_stats, received_attention

__all__ = ["ATTENTION_NAME", "StreamedRecorder", "streamed_attention_forward"]

ATTENTION_NAME = "workbench_streamed"

_ACTIVE: ContextVar[StreamedRecorder | None] = ContextVar("workbench_streamed", default=None)


@dataclass
class _Forward:
    """What one forward pass recorded, keyed by layer index."""

    stats: dict[int, AttentionStats] = field(default_factory=dict)
    received: dict[int, Tensor] = field(default_factory=dict)
    calls: int = 0  # attention calls so far, the layer index of modules without ``layer_idx``


class StreamedRecorder:
    """Context manager: run ``model`` with the streamed attention function and record stats.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention uses ``AttentionInterface``.
        sink_size, recent_window, spans: as for `kernels.attention_stats` (absolute key
            positions).
        q_positions: absolute positions of the queries to keep (``[n]`` ints); None keeps all.
        query_mask: bool ``[batch, q_len]`` selecting queries for ``received`` and
            ``reduce="mean"``; None selects all.
        received: also record the attention each key receives (column sums over the selected
            queries) per layer, ``[batch, n_heads, k_len]``.
        reduce: None keeps per-query statistics; ``"mean"`` keeps their mean over the selected
            queries (fully masked rows excluded), ``[batch, n_heads]`` per field.
        device: where recorded tensors go (default the CPU).
        backend: kernel backend, as for `kernels.attention_stats`.
        on_layer: streams instead of keeping: called as ``on_layer(layer, stats, received)``
            once per attention layer and forward pass, with that layer's statistics (and
            received attention, else None) already on ``device``, e.g. to write them to a run
            file as they arrive. The recorder then keeps nothing (``forwards``, ``stats`` and
            ``received`` raise), so host memory holds one layer's statistics at a time.
        output: where each layer's attention output comes from. ``"kernel"``: the fused pass
            (`kernels.attention_stats` with ``return_output=True``), statistics and output in one
            walk over the keys; ``"sdpa"``: SDPA for the output plus a separate statistics pass;
            ``"auto"`` (default): the fused pass when the Triton kernel runs (CUDA) and every
            query is recorded; SDPA when only ``q_positions`` are (their statistics pass is
            then small) and on the CPU (the torch reference is slower than SDPA there).
            Timings on an H100 are in docs/benchmarks.md. Where SDPA cannot give the output
            (padding, a KV cache) the fused pass is used whatever this says; with attention
            dropout, SDPA is.

    Attributes:
        forwards: one entry per forward pass inside the context (generation makes several),
            each a list over layers of `AttentionStats`.
        stats: the last forward's list.
        received: the last forward's received attention per layer (with ``received=True``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        sink_size: int = 1,
        recent_window: int | None = None,
        spans: Tensor | list[list[int]] | None = None,
        q_positions: Tensor | list[int] | None = None,
        query_mask: Tensor | None = None,
        received: bool = False,
        reduce: str | None = None,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        on_layer: Callable[[int, AttentionStats, Tensor | None], None] | None = None,
        output: str = "auto",
    ) -> None:
        if reduce not in (None, "mean"):
            raise ValueError(f"reduce must be None or 'mean', got {reduce!r}")
        if output not in ("auto", "kernel", "sdpa"):
            raise ValueError(f"output must be 'auto', 'kernel' or 'sdpa', got {output!r}")
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError(
                f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
            )
        self.model = model
        self.sink_size = sink_size
        self.recent_window = recent_window
        self.spans = spans
        self.q_positions = None if q_positions is None else torch.as_tensor(q_positions).long()
        self.query_mask = query_mask
        self.record_received = received
        self.reduce = reduce
        self.device = torch.device(device)
        self.backend = backend
        self.on_layer = on_layer
        self.output = output
        self._rows: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}
        self._runs: list[_Forward] = []  # forwards that completed
        self._pending: _Forward | None = None  # the forward in progress
        self._saved: list[tuple[Any, Any]] = []
        self._token = None
        self._hooks: list[Any] = []

    # -- context -----------------------------------------------------------------------------

    def __enter__(self) -> StreamedRecorder:
        register()
        self._saved = [(c, c._attn_implementation_internal) for c in _configs(self.model)]
        self.model.set_attn_implementation(ATTENTION_NAME)
        self._hooks = [
            self.model.register_forward_pre_hook(self._begin),
            self.model.register_forward_hook(self._end),
        ]
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)
        for hook in self._hooks:
            hook.remove()
        for config, implementation in self._saved:
            config._attn_implementation_internal = implementation

    def _begin(self, *_: object) -> None:
        self._pending = _Forward()

    def _end(self, *_: object) -> None:
        if self._pending is not None:  # a forward that raised is never committed
            self._runs.append(self._pending)
            self._pending = None

    # -- results -----------------------------------------------------------------------------

    @property
    def forwards(self) -> list[list[AttentionStats]]:
        if torch.cuda.is_initialized():  # the non-blocking copies to the CPU have landed
            torch.cuda.synchronize()
        for run in self._runs:
            if not run.calls:
                raise RuntimeError(
                    f"a forward pass of {type(self.model).__name__} did not call the streamed "
                    "attention function: its attention modules do not dispatch through "
                    "transformers' AttentionInterface (a TransformerBridge replaces them in "
                    "place; give the bridge its own copy of the model)"
                )
        self._check_kept()
        return [[run.stats[i] for i in sorted(run.stats)] for run in self._runs]

    def _check_kept(self) -> None:
        if self.on_layer is not None:
            raise RuntimeError("the statistics were handed to on_layer, not kept")

    @property
    def stats(self) -> list[AttentionStats]:
        if not self._runs:
            raise RuntimeError("no forward pass ran inside the StreamedRecorder context")
        return self.forwards[-1]

    @property
    def received(self) -> list[Tensor]:
        if not self.record_received:
            raise RuntimeError("pass received=True to record received attention")
        if not self._runs:
            raise RuntimeError("no forward pass ran inside the StreamedRecorder context")
        self._check_kept()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        run = self._runs[-1]
        return [run.received[i] for i in sorted(run.received)]

    # -- recording ---------------------------------------------------------------------------

    def _record(
        self,
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        causal: bool,
        scale: float | None,
        key_padding_mask: Tensor | None,
        need_output: bool,
        may_output: bool = True,
    ) -> Tensor | None:
        """Record one layer's statistics; returns the attention output if ``need_output``, or
        where the fused pass gives it (``self.output``; only if ``may_output``), else None."""
        if self._pending is None:  # an attention module called outside the model's forward
            self._pending = _Forward()
            self._runs.append(self._pending)
        run = self._pending
        layer = getattr(module, "layer_idx", None)
        layer = run.calls if layer is None else int(layer)
        run.calls += 1

        q_len, k_len = query.shape[2], key.shape[2]
        offset = k_len - q_len  # absolute position of query row 0 (KV-cache convention)
        rows, positions = self._kept_rows(offset, k_len, query.device)  # [n] each
        query_mask = self.query_mask
        if query_mask is not None:
            if query_mask.shape != (query.shape[0], q_len):
                raise ValueError(
                    f"query_mask must be [batch={query.shape[0]}, q_len={q_len}], "
                    f"got {tuple(query_mask.shape)}"
                )
            query_mask = query_mask.to(query.device)

        common = dict(causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                      backend=self.backend)  # fmt: skip
        kept = dict(sink_size=self.sink_size, recent_window=self.recent_window, spans=self.spans)
        output = None
        fused = may_output and (
            self.output == "kernel"
            or (
                self.output == "auto" and rows is None and query.is_cuda and self.backend != "torch"
            )
        )
        if need_output or fused:  # every query's output is needed anyway; keep rows afterwards
            st = attention_stats(query, key, value, return_output=True, **kept, **common)
            output, st.output = st.output, None
            if rows is not None:
                st = st.apply(lambda t: t[:, :, rows])
        elif rows is None:
            st = attention_stats(query, key, **kept, **common)
        else:
            st = attention_stats(query[:, :, rows], key, q_positions=positions, **kept, **common)
        q_sel = query if rows is None else query[:, :, rows]
        if rows is not None and query_mask is not None:
            query_mask = query_mask[:, rows]

        rec = None  # [batch, n_heads, k_len]
        if self.record_received:
            rec = received_attention(
                q_sel, key, st.lse, q_positions=positions, query_mask=query_mask, **common
            )
        if self.reduce == "mean":
            st = _mean_over_queries(st, query_mask)
        if self.on_layer is not None:  # blocking copies: the callback reads them at once
            received = None if rec is None else rec.to(self.device)
            self.on_layer(layer, st.apply(lambda t: t.to(self.device)), received)
            return output
        # non-blocking: the GPU goes on with the next layer; `forwards` synchronizes
        if rec is not None:
            run.received[layer] = rec.to(self.device, non_blocking=True)
        run.stats[layer] = st.apply(lambda t: t.to(self.device, non_blocking=True))
        return output

    def _kept_rows(
        self, offset: int, k_len: int, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None]:
        """Query rows to keep on ``device`` and their absolute positions (on the CPU, where the
        kernels validate them without waiting for the GPU); None, None keeps all. Computed on
        the CPU once per shape: a boolean index on the GPU would wait for it every layer."""
        if self.q_positions is None:
            return None, None
        key = (offset, k_len, device)
        if key not in self._rows:
            pos = self.q_positions
            pos = pos[(pos >= offset) & (pos < k_len)]
            self._rows[key] = ((pos - offset).to(device), pos)
        return self._rows[key]


def _mean_over_queries(st: AttentionStats, query_mask: Tensor | None) -> AttentionStats:
    """Mean of each statistic over the selected queries with at least one visible key."""
    weight = torch.isfinite(st.lse).float()  # [batch, n_heads, q]
    if query_mask is not None:
        weight = weight * query_mask[:, None, :]
    total = weight.sum(-1).clamp(min=1)  # [batch, n_heads]

    def mean(t: Tensor) -> Tensor:
        if t.ndim == 4:  # span_mass [batch, n_heads, q, n_spans]
            return (t * weight[..., None]).sum(2) / total[..., None]
        return torch.where(weight > 0, t, 0.0).mul(weight).sum(-1) / total

    reduced = AttentionStats(
        lse=st.lse,
        entropy=st.entropy,
        max_prob=st.max_prob,
        argmax=None,
        sink_mass=st.sink_mass,
        span_mass=st.span_mass,
        outside_mass=st.outside_mass,
    )
    return reduced.apply(mean)


# ---------------------------------------------------------------------------------------------
# The functions registered with transformers.


def streamed_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` function: SDPA output plus statistics for the active recorder.

    ``query [batch, n_heads, q_len, d]``, ``key/value [batch, n_kv_heads, k_len, d]``;
    ``attention_mask`` is what the companion mask function made (None or a 2D key padding
    mask). Returns ``(attn_output [batch, q_len, n_heads, d_v], None)``.
    """
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"the streamed attention path does not support {unsupported!r} "
                f"({type(module).__name__}); use the pattern capture path"
            )
    if attention_mask is not None and attention_mask.ndim != 2:
        raise NotImplementedError(
            "the streamed attention path takes causal/bidirectional attention with key padding; "
            f"got a custom {attention_mask.ndim}D attention mask"
        )
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    q_len, k_len = query.shape[2], key.shape[2]
    pad = attention_mask  # [batch, k_len] bool, True = real token
    recorder = _ACTIVE.get()

    # SDPA needs a materialised mask for padding, and aligns is_causal top-left when
    # q_len < k_len: there the stats kernel gives the output in the same pass.
    use_kernel = pad is not None or (causal and 1 < q_len < k_len)
    if use_kernel and dropout > 0:
        raise NotImplementedError("attention dropout with padding is not supported here")
    output = None
    if recorder is not None:
        output = recorder._record(
            module, query, key, value, causal=causal, scale=scaling, key_padding_mask=pad,
            need_output=use_kernel, may_output=dropout == 0,
        )  # fmt: skip
    elif use_kernel:
        output = attention_stats(
            query, key, value, causal=causal, scale=scaling, key_padding_mask=pad,
            return_output=True,
        ).output  # fmt: skip
    if output is None:
        output = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling, is_causal=causal and q_len > 1,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
    return output.transpose(1, 2).contiguous(), None


def streamed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """``AttentionMaskInterface`` function: the 2D key padding mask ``[batch, kv_length]``
    (True = real token), or None when nothing is padded."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    plain = mask_function in (causal_mask_function, bidirectional_mask_function)
    if not plain and not (local_size is not None and kv_offset + kv_length <= local_size):
        raise NotImplementedError(
            "the streamed attention path supports causal and bidirectional attention with "
            "padding; this model asked for another mask (sliding window or chunks shorter than "
            f"the input ({local_size} < {kv_offset + kv_length}), packed sequences, or a custom "
            "mask function)"
        )
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise NotImplementedError(f"expected a 2D padding mask, got {attention_mask.ndim}D")
    pad = attention_mask.bool()[:, kv_offset : kv_offset + kv_length]
    if pad.shape[1] < kv_length:  # keys beyond the given mask are real (e.g. a static cache)
        pad = F.pad(pad, (0, kv_length - pad.shape[1]), value=True)
    if bool(pad.all()):
        return None
    return pad.expand(batch_size, -1)


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, streamed_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, streamed_mask)


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
