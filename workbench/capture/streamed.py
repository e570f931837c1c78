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

Masks and variants. The recorder runs the model through the attention-function swap of
:mod:`workbench.capture.attention`: causal versus bidirectional, key padding, local windows
(Mistral, Gemma 2/3, gpt-oss, Cohere2, ModernBERT), chunks (Llama 4), logit softcapping and
learned sink logits reach the kernels exactly as the model's eager attention applies them.
What the kernels cannot reproduce (ALiBi-style position biases, custom 4D masks, packed
sequences) is refused with a :class:`~workbench.errors.CaptureError`.

Queries. With a KV cache the ``q_len`` queries are the last ``q_len`` key positions (while
generating, one query per forward pass against every cached key). A sliding-window cache
(transformers' ``DynamicSlidingWindowLayer``, the default cache of Mistral and Gemma 2/3 while
generating) hands a local layer only its last keys; the recorder still reports absolute
positions: sinks, spans, ``argmax`` and ``q_positions`` refer to positions in the sequence, and
keys the cache dropped (outside every window) receive no attention. The recorder's
``q_positions`` keeps only the queries at those absolute positions (e.g. the answer tokens);
``query_mask [batch, q_len]`` selects queries for the received attention and for
``reduce="mean"``, which stores the per-head mean over the selected queries instead of
per-query statistics (``argmax`` is then None).

Waiting. Without ``on_layer``, recording does not wait for the GPU: inputs from the CPU go over
with non-blocking copies, and statistics leave it with non-blocking copies to ``device`` (the
CPU by default, a few small copies per layer), or stay on it with ``device=<the GPU>``, e.g. to
keep every token of a generation there and copy them once at the end.
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
from workbench.capture.attention import (
    AttentionCall,
    KeyMask,
    attend,
    needs_kernel_output,
    register,
    use_attention,
)

__all__ = ["ATTENTION_NAME", "StreamedRecorder", "streamed_attention"]

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
        on_attention: called as ``on_attention(layer, call, output)`` once per attention layer
            and forward pass, after the layer's output is computed and before the model reads
            it: the parsed :class:`AttentionCall` (its ``value [batch, n_kv_heads, k_len, d_v]``
            are the post-projection values the heads mix, whatever the family's projection
            modules) and ``output [batch, n_heads, q_len, d_v]``, which the model's output
            projection consumes next. For statistics of values (e.g. the sinks probes' value
            norms); the recorder keeps neither, and a callback that does holds O(L·d) per layer.

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
        on_attention: Callable[[int, AttentionCall, Tensor], None] | None = None,
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
        self.on_attention = on_attention
        self._rows: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}
        self.masks: dict[int, KeyMask] = {}  # per layer, the window and chunk its keys had
        self._runs: list[_Forward] = []  # forwards that completed
        self._pending: _Forward | None = None  # the forward in progress
        self._swap = use_attention(model, ATTENTION_NAME)
        self._token = None
        self._hooks: list[Any] = []

    # -- context -----------------------------------------------------------------------------

    def __enter__(self) -> StreamedRecorder:
        self._swap.__enter__()
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
        self._swap.__exit__(*exc)

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

    def _record(self, call: AttentionCall, *, need_output: bool) -> tuple[int, Tensor | None]:
        """Record one layer's statistics; returns the layer index and the attention output if
        ``need_output``, or where the fused pass gives it (``self.output``; not with dropout),
        else None."""
        if self._pending is None:  # an attention module called outside the model's forward
            self._pending = _Forward()
            self._runs.append(self._pending)
        run = self._pending
        layer = run.calls if call.layer is None else call.layer
        run.calls += 1
        self.masks[layer] = KeyMask(window=call.window, chunk=call.chunk)
        query, key, value = call.query, call.key, call.value

        q_len, k_len = query.shape[2], key.shape[2]
        first_key = call.key_offset  # absolute position of key 0 (> 0: a sliding-window cache)
        rows, positions = self._kept_rows(first_key, q_len, k_len, query.device)  # [n] each
        query_mask = self.query_mask
        if query_mask is not None:
            if query_mask.shape != (query.shape[0], q_len):
                raise ValueError(
                    f"query_mask must be [batch={query.shape[0]}, q_len={q_len}], "
                    f"got {tuple(query_mask.shape)}"
                )
            query_mask = query_mask.to(query.device, non_blocking=True)

        common = dict(**call.kernel_options(), backend=self.backend)
        kept = self._kept_keys(first_key)
        output = None
        fused = call.dropout == 0 and (
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
        if first_key:  # key indices of this call -> absolute positions
            st.argmax = torch.where(st.argmax >= 0, st.argmax + first_key, st.argmax)

        rec = None  # [batch, n_heads, first_key + k_len]
        if self.record_received:
            rec = received_attention(
                q_sel, key, st.lse, q_positions=positions, query_mask=query_mask, **common
            )
            if first_key:  # keys the cache dropped are outside every window: they receive 0
                rec = F.pad(rec, (first_key, 0))
        if self.reduce == "mean":
            st = _mean_over_queries(st, query_mask)
        if self.on_layer is not None:  # blocking copies: the callback reads them at once
            received = None if rec is None else rec.to(self.device)
            self.on_layer(layer, st.apply(lambda t: t.to(self.device)), received)
            return layer, output
        # non-blocking: the GPU goes on with the next layer; `forwards` synchronizes
        if rec is not None:
            run.received[layer] = rec.to(self.device, non_blocking=True)
        # a no-op `.to` per field costs host time on every decoding step
        if not _already_on(self.device, query.device):
            st = st.apply(lambda t: t.to(self.device, non_blocking=True))
        run.stats[layer] = st
        return layer, output

    def _kept_rows(
        self, first_key: int, q_len: int, k_len: int, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None]:
        """Query rows to keep on ``device`` and their positions among the call's keys (on the
        CPU, where the kernels validate them without waiting for the GPU); None, None keeps
        all. Row ``i`` of a call whose first key sits at absolute position ``first_key`` is at
        ``first_key + k_len - q_len + i``. Computed on the CPU once per shape and sent without
        a blocking copy: a boolean index on the GPU, or a blocking copy, would wait for the GPU
        every layer (or, while decoding, every token)."""
        if self.q_positions is None:
            return None, None
        key = (first_key, q_len, k_len, device)
        if key not in self._rows:
            if len(self._rows) >= 64:  # decoding makes a new shape every token
                self._rows.clear()
            start = first_key + k_len - q_len  # absolute position of row 0
            pos = self.q_positions
            pos = pos[(pos >= start) & (pos < first_key + k_len)]
            self._rows[key] = ((pos - start).to(device, non_blocking=True), pos - first_key)
        return self._rows[key]

    def _kept_keys(self, first_key: int) -> dict[str, Any]:
        """``sink_size``, ``recent_window`` and ``spans`` for a call whose key 0 sits at absolute
        position ``first_key``: sinks and spans are absolute, so they move by ``-first_key``
        (what the cache dropped counts as empty). The recent window is relative to each query
        and stays."""
        kept = dict(sink_size=self.sink_size, recent_window=self.recent_window, spans=self.spans)
        if not first_key:
            return kept
        kept["sink_size"] = max(self.sink_size - first_key, 0)
        if self.spans is not None:
            shifted = (torch.as_tensor(self.spans) - first_key).clamp(min=0)
            # a list stays a list: the kernels cache span lists on the device
            kept["spans"] = shifted if isinstance(self.spans, Tensor) else shifted.tolist()
        return kept


def _already_on(target: torch.device, actual: torch.device) -> bool:
    """Whether ``tensor.to(target)`` of a tensor on ``actual`` is a no-op (``"cuda"`` without an
    index means the current GPU)."""
    if target.index is None and target.type == "cuda" == actual.type:
        return actual.index == torch.cuda.current_device()
    return target == actual


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
# The function registered with transformers.


def streamed_attention(call: AttentionCall) -> Tensor:
    """The streamed path's attention function: the layer's output ``[batch, n_heads, q_len,
    d_v]`` (SDPA, or the fused kernel where SDPA would need a mask) plus statistics for the
    active recorder, computed from the same q and k."""
    recorder = _ACTIVE.get()
    if recorder is None:
        return attend(call)
    layer, output = recorder._record(call, need_output=needs_kernel_output(call))
    output = attend(call) if output is None else output
    if recorder.on_attention is not None:
        recorder.on_attention(layer, call, output)
    return output


register(ATTENTION_NAME, streamed_attention)
