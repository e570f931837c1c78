"""Attention statistics: the definitions, and a plain-torch reference for every kernel.

This module is the one place where the statistics are defined. The Triton kernels
(`kernels.attention_stats`, `kernels.received`) compute the same numbers in one streamed pass;
`stats_from_pattern` computes them from an already materialised probability pattern (the
short "pattern" capture path). Tests hold all three together.

Notation
--------
For batch row ``b``, query head ``h`` and query row ``i`` (absolute key position ``p_i``, see
``q_positions``), the *logits* over keys ``j`` are computed in fp32 (fp64 for fp64 inputs) as

1. ``s_ij = scale · q_i · k_j`` with ``scale = d_head ** -0.5`` unless given;
2. with ``softcap = c``: ``s_ij ← c · tanh(s_ij / c)`` (Gemma 2's order: scale first, then cap);
3. with ``alibi_slopes = m`` ([n_heads]): ``s_ij ← s_ij + m_h · (j - p_i)``. BLOOM and Falcon add
   ``m_h · j'`` with ``j'`` the key's index among the row's real tokens; under left or right
   padding that differs from ``m_h · (j - p_i)`` by a constant per row, so every probability and
   statistic below agrees and only ``lse`` is shifted (by ``m_h`` times ``p_i`` minus the row's
   leading padding). Our form keeps the logits near 0 at long context. Falcon's slopes are
   BLOOM's divided by ``sqrt(d_head)``: pass the slopes as the model adds them to the scaled
   scores.

Query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)`` (grouped-query attention,
the Hugging Face ``repeat_kv`` rule). Values may have their own width ``d_v`` (MLA: DeepSeek-V3
has ``d_head = 192``, ``d_v = 128``).

Key ``j`` is *visible* to query ``i`` when ``key_padding_mask[b, j]`` is True (a real token) and
``first(p_i) <= j < end(p_i)`` (`key_range`), the intersection of

- causal attention: ``j <= p_i``;
- a sliding window ``window = W``, the ``sliding_window`` a Hugging Face model hands its attention
  function: causal ``p_i - W < j <= p_i`` (W keys, the query's own included; transformers'
  ``sliding_window_overlay``, Mistral, Gemma 2/3, gpt-oss); bidirectional ``|p_i - j| < W``
  (``2W - 1`` keys; ModernBERT hands its attention function ``W = local_attention // 2 + 1``
  and masks ``|p_i - j| <= local_attention // 2`` with ``sliding_window_bidirectional_overlay``);
- chunks of ``chunk = C`` keys (Llama 4): ``⌊(j - o_b) / C⌋ = ⌊(p_i - o_b) / C⌋`` with ``o_b``
  the number of leading padding keys of row ``b`` (0 without ``key_padding_mask``): chunks start
  at each row's first real token, as in transformers' ``chunked_overlay``.

*Learned sinks* (gpt-oss's ``sinks``, ``z`` of shape [n_heads]) add one logit per head to the
softmax denominator that has no key and no value: ``lse_i = log(Σ_visible exp(s_ij) + exp(z_h))``.
Without them the ``exp(z_h)`` term is absent. The attention probabilities are
``P_ij = exp(s_ij - lse_i)`` for visible ``j`` and 0 otherwise; with learned sinks they sum to
``1 - learned_sink_mass``.

Statistics per (batch, head, query) -- ``AttentionStats``
---------------------------------------------------------
- ``lse``: ``log Σ_visible exp(s_ij)`` (natural log), plus ``exp(z_h)`` inside the log with
  learned sinks: the log of the softmax's whole denominator, so ``exp(s_ij - lse)`` is the
  probability the output is computed from.
- ``entropy``: ``-Σ_j P_ij log P_ij`` in nats, over the whole distribution: with learned sinks
  the sink slot's ``-P_z log P_z`` is included. The streamed kernels use the stable running form
  ``u = Σ e^{s-m} (s - m)``, ``l = Σ e^{s-m}``, ``H = log l - u / l``, which is the same number.
- ``max_prob``: ``max_j P_ij`` over keys (never the learned sink); ``argmax``: the key index where
  it is reached. Ties go to the smallest key index. Computed from logits where logits exist
  (kernels, reference), from probabilities in ``stats_from_pattern``; two keys whose
  probabilities round to the same value may therefore come out in either order between the
  paths.
- ``sink_mass``: ``Σ_{j < S} P_ij`` with ``S = sink_size`` (the first S keys, StreamingLLM's
  "attention sinks"; not the learned sink).
- ``span_mass[..., n]``: ``Σ_{start_n <= j < end_n} P_ij`` for each given key span (e.g. the
  needle of a needle-in-a-haystack prompt).
- ``outside_mass``: ``Σ_{S <= j <= p_i - W} P_ij`` with ``W = recent_window``: the mass on keys
  that are neither sinks nor among the ``W`` most recent keys (the query's own key included). It
  is what a head loses when its cache keeps only sinks plus a recent window, the proxy used to
  tell streaming heads from retrieval heads. For bidirectional attention, keys after ``p_i`` are
  not counted as outside either. Keys a sliding window or a chunk hides have ``P_ij = 0``.
- ``learned_sink_mass``: ``P_z = exp(z_h - lse_i)``, the probability the learned sink takes
  (None without ``sinks``).
- ``output``: ``Σ_j P_ij v_j`` (only on request; in v's dtype; the learned sink adds nothing).

A *fully masked* row (no visible key, e.g. a left-padding query under a causal mask) has
``lse = -inf``, ``entropy = 0``, ``max_prob = 0``, ``argmax = -1``, all masses 0 and output 0.
With learned sinks its whole probability sits on the sink: ``lse = z_h``,
``learned_sink_mass = 1``, entropy 0, the rest as above.

Statistic per (batch, head, key) -- ``received_attention``
-----------------------------------------------------------
``R_bhj = Σ_{i selected} P_ij``: the column sums of the attention pattern over the queries
selected by ``query_mask`` (all by default). It needs the final ``lse`` of each row, so it is a
second pass; with learned sinks that ``lse`` includes the sink, so
``Σ_j R_bhj + Σ_{i selected} learned_sink_mass_i`` is the number of selected live rows. Padding
keys receive 0.

Keys per (batch, head, query) -- ``top_keys``
----------------------------------------------
The ``k_top`` visible keys with the largest logits ``s_ij`` (so the largest probabilities), the
largest first, each with its probability ``P_ij = exp(s_ij - lse_i)`` (the row's whole
log-sum-exp, learned sink included) and its key index. Ties go to the smaller key index, as for
``argmax``; ordering by logits, not by rounded probabilities. A row with fewer than ``k_top``
visible keys is padded with probability 0 and index -1 (a fully masked row is all padding). The
first column is ``max_prob`` and ``argmax``; the rest say where the remaining weight goes, which
a long prompt's view can show per query without an L×L pattern.

The references below chunk over queries and keys, so their memory is
O(batch · n_heads · chunk²) on any device; they accumulate in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = [
    "AttentionStats",
    "attention_stats",
    "key_range",
    "received_attention",
    "stats_from_pattern",
    "top_keys",
]

SpansLike = Tensor | Sequence[Sequence[int]]


@dataclass
class AttentionStats:
    """Per-(batch, head, query) attention statistics; definitions in `kernels.reference`.

    All tensors are fp32 (fp64 from the reference on fp64 inputs) and shaped
    ``[batch, n_heads, q_len]`` unless said otherwise. ``lse`` and ``output`` are None when
    computed from a materialised pattern; ``argmax`` is None after a reduction over queries;
    ``learned_sink_mass`` is None for models without learned sink logits.
    """

    lse: Tensor | None  # [batch, n_heads, q_len]
    entropy: Tensor  # [batch, n_heads, q_len]
    max_prob: Tensor  # [batch, n_heads, q_len]
    argmax: Tensor | None  # [batch, n_heads, q_len] int64, -1 for fully masked rows
    sink_mass: Tensor  # [batch, n_heads, q_len]
    span_mass: Tensor | None = None  # [batch, n_heads, q_len, n_spans]
    outside_mass: Tensor | None = None  # [batch, n_heads, q_len]
    output: Tensor | None = None  # [batch, n_heads, q_len, d_v] in v's dtype
    learned_sink_mass: Tensor | None = None  # [batch, n_heads, q_len]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> AttentionStats:
        """A new AttentionStats with ``fn`` applied to every tensor that is present."""
        return AttentionStats(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )

    def to(self, device: torch.device | str) -> AttentionStats:
        """Every tensor moved to ``device``."""
        return self.apply(lambda t: t.to(device))

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            t = getattr(self, f.name)
            desc = (
                "None" if t is None else f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            )
            parts.append(f"  {f.name}: {desc}")
        return "AttentionStats(\n" + "\n".join(parts) + "\n)"


# ---------------------------------------------------------------------------------------------
# Argument checking shared by every backend.


@dataclass
class _Args:
    """Validated, normalised arguments (shapes in comments)."""

    scale: float
    # [q_len] int64 on q's device; None for the default positions when not materialised
    q_positions: Tensor | None
    key_padding_mask: Tensor | None  # [batch, k_len] bool
    spans: Tensor | None  # [batch or 1, n_spans, 2] int64 on q's device
    default_positions: bool  # q_positions == arange(k_len - q_len, k_len)
    sorted_positions: bool  # q_positions non-decreasing
    window: int | None = None  # sliding window W (module docstring)
    chunk: int | None = None  # chunk size C
    chunk_start: Tensor | None = None  # [batch] int64 leading padding keys o_b; None: all 0
    softcap: float | None = None
    sinks: Tensor | None = None  # [n_heads] learned sink logits z_h, q's device
    alibi_slopes: Tensor | None = None  # [n_heads] m_h, q's device


def _shape(t: Tensor) -> str:
    return f"{tuple(t.shape)}"


def check_qk(q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
    """Raise ValueError unless q, k (and v) have the documented shapes and dtypes."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, n_heads, q_len, d_head], got shape {_shape(q)}")
    batch, n_heads, _, d_head = q.shape
    if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != d_head:
        raise ValueError(
            f"k must be [batch={batch}, n_kv_heads, k_len, d_head={d_head}], got shape {_shape(k)}"
        )
    if k.shape[1] == 0 or n_heads % k.shape[1] != 0:
        raise ValueError(
            f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({k.shape[1]}); "
            f"q is {_shape(q)}, k is {_shape(k)}"
        )
    if v is not None and (v.ndim != 4 or v.shape[:3] != k.shape[:3]):
        raise ValueError(
            f"v must be [batch, n_kv_heads, k_len, d_v] matching k {_shape(k)}, got {_shape(v)}"
        )
    for name, t in (("k", k), ("v", v)):
        if t is not None and (t.dtype != q.dtype or t.device != q.device):
            raise ValueError(
                f"{name} must have q's dtype and device ({q.dtype}, {q.device}), "
                f"got {t.dtype}, {t.device}"
            )
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")


def check_args(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None,
    q_positions: Tensor | None,
    key_padding_mask: Tensor | None,
    spans: SpansLike | None = None,
    sink_size: int = 0,
    recent_window: int | None = None,
    window: int | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    materialize_positions: bool = True,
) -> _Args:
    """Validate and normalise the keyword arguments shared by all kernels.

    Nothing here waits for the GPU unless ``q_positions`` is already a GPU tensor (its range is
    then checked there, one sync): lists and CPU tensors are checked on the CPU and sent with a
    non-blocking copy; span lists are cached on the device. ``sinks`` and ``alibi_slopes`` are
    checked for finite values only when they live on the CPU, for the same reason. The Triton
    paths pass ``materialize_positions=False`` and derive the default positions inside the
    kernels.
    """
    batch, n_heads, q_len, d_head = q.shape
    k_len = k.shape[2]
    if scale is None:
        scale = d_head**-0.5
    if sink_size < 0:
        raise ValueError(f"sink_size must be >= 0, got {sink_size}")
    if recent_window is not None and recent_window < 1:
        raise ValueError(f"recent_window must be >= 1 or None, got {recent_window}")

    default_positions = q_positions is None
    is_sorted = True
    if q_positions is None:
        if q_len > k_len:
            raise ValueError(
                f"q_len ({q_len}) > k_len ({k_len}): pass q_positions to place the queries"
            )
        if materialize_positions:
            q_positions = torch.arange(k_len - q_len, k_len, device=q.device)
    else:
        q_positions, is_sorted = _check_positions(q_positions, q_len, k_len, q.device)

    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, k_len) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be bool [batch={batch}, k_len={k_len}], "
                f"got {key_padding_mask.dtype} {_shape(key_padding_mask)}"
            )
        key_padding_mask = key_padding_mask.to(q.device)

    spans_t = None if spans is None else _spans_on(spans, batch, q.device)
    window = _positive_int("window", window)
    chunk = _positive_int("chunk", chunk)
    chunk_start = None
    if chunk is not None and key_padding_mask is not None:
        # transformers' chunked_overlay: chunks start at each row's first real token
        chunk_start = (key_padding_mask.cumsum(-1) == 0).sum(-1)  # [batch] int64
    if softcap is not None and (
        isinstance(softcap, bool)
        or not isinstance(softcap, numbers.Real)
        or not math.isfinite(softcap)
        or softcap <= 0
    ):
        raise ValueError(f"softcap must be a finite positive number or None, got {softcap!r}")
    return _Args(
        float(scale),
        q_positions,
        key_padding_mask,
        spans_t,
        default_positions,
        is_sorted,
        window=window,
        chunk=chunk,
        chunk_start=chunk_start,
        softcap=None if softcap is None else float(softcap),
        sinks=_per_head("sinks", sinks, n_heads, q.device),
        alibi_slopes=_per_head("alibi_slopes", alibi_slopes, n_heads, q.device),
    )


def _positive_int(name: str, value: int | None) -> int | None:
    """``value`` as an int; ValueError unless it is None or an integer >= 1 (bools refused)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def _per_head(name: str, t: Tensor | None, n_heads: int, device: torch.device) -> Tensor | None:
    """A validated float ``[n_heads]`` tensor on ``device`` (non-blocking copy), or None."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.shape != (n_heads,) or not t.is_floating_point():
        got = f"{t.dtype} {_shape(t)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor [n_heads={n_heads}], got {got}")
    if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t.to(device, non_blocking=True)


def _check_positions(
    q_positions: Tensor | Sequence[int], q_len: int, k_len: int, device: torch.device
) -> tuple[Tensor, bool]:
    """q_positions as int64 on ``device``, and whether they are sorted."""
    pos = torch.as_tensor(q_positions)
    if pos.shape != (q_len,) or pos.is_floating_point():
        raise ValueError(
            f"q_positions must be an integer tensor [q_len={q_len}], got {pos.dtype} {_shape(pos)}"
        )
    pos = pos.long()
    out_of_range, is_sorted = False, True
    if q_len:
        flags = torch.stack([((pos < 0) | (pos >= k_len)).any(), (pos[1:] >= pos[:-1]).all()])
        out_of_range, is_sorted = flags.tolist()  # on the CPU unless pos lives on the GPU
    if out_of_range:
        raise ValueError(f"q_positions must lie in [0, k_len={k_len})")
    return pos.to(device, non_blocking=True), bool(is_sorted)


# Span lists already validated and sent, by (spans, batch, device): a recorder passes the same
# list to every layer, and each copy to the GPU would be one more transfer per call.
_SPANS_CACHE: dict[tuple, Tensor] = {}


def _spans_on(spans: SpansLike, batch: int, device: torch.device) -> Tensor:
    """Validated ``[batch or 1, n_spans, 2]`` int64 spans on ``device`` (never a blocking copy)."""
    key = None
    if not isinstance(spans, Tensor):
        try:
            key = (tuple(tuple(int(x) for x in row) for row in spans), batch, str(device))
        except TypeError:  # a list of per-batch lists: validated below, not cached
            key = None
        if key is not None and key in _SPANS_CACHE:
            return _SPANS_CACHE[key]
    spans_t = torch.as_tensor(spans)
    if spans_t.ndim == 2:
        spans_t = spans_t[None]
    if (
        spans_t.ndim != 3
        or spans_t.shape[-1] != 2
        or spans_t.shape[0] not in (1, batch)
        or spans_t.is_floating_point()
    ):
        raise ValueError(
            f"spans must be integer [n_spans, 2] or [batch={batch}, n_spans, 2] "
            f"[start, end) ranges, got {_shape(torch.as_tensor(spans))}"
        )
    spans_t = spans_t.long().contiguous().to(device, non_blocking=True)
    if key is not None:
        if len(_SPANS_CACHE) >= 64:
            _SPANS_CACHE.clear()
        _SPANS_CACHE[key] = spans_t
    return spans_t


# ---------------------------------------------------------------------------------------------
# The definitions, applied to one block of keys.


def key_range(
    q_pos: Tensor,
    k_len: int,
    *,
    causal: bool,
    window: int | None = None,
    chunk: int | None = None,
    chunk_start: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The keys queries at positions ``q_pos`` [n] may see before padding: ``first <= j < end``.

    Causal mask, sliding window and chunks as defined in the module docstring; ``chunk_start``
    [batch] holds each row's leading padding o_b (None: 0). Returns ``(first, end)``, int64
    ``[batch or 1, n]`` each (``[batch, n]`` only with ``chunk_start``); ``end <= first`` means no
    key. Both never decrease as the position grows, which the kernels' loop bounds rely on
    (`kernels.blocks`).
    """
    p = q_pos.long()[None, :]  # [1, n]
    first = torch.zeros_like(p)
    end = torch.full_like(p, k_len)
    if causal:
        end = torch.minimum(end, p + 1)
    if window is not None:
        first = torch.maximum(first, p - window + 1)
        if not causal:
            end = torch.minimum(end, p + window)
    if chunk is not None:
        offset = 0 if chunk_start is None else chunk_start.long()[:, None]  # [batch, 1]
        start = offset + torch.div(p - offset, chunk, rounding_mode="floor") * chunk
        first = torch.maximum(first, start)
        end = torch.minimum(end, start + chunk)
    return first, end


def _visible(key_idx: Tensor, q_pos: Tensor, a: _Args, k_len: int, *, causal: bool) -> Tensor:
    """Visibility of keys ``key_idx`` [kc] to queries at ``q_pos`` [qc]: [batch or 1, 1, qc, kc]."""
    first, end = key_range(
        q_pos, k_len, causal=causal, window=a.window, chunk=a.chunk, chunk_start=a.chunk_start
    )  # [batch or 1, qc] each
    vis = (key_idx >= first[..., None]) & (key_idx < end[..., None])  # [batch or 1, qc, kc]
    if a.key_padding_mask is not None:
        vis = vis & a.key_padding_mask[:, None, key_idx]
    return vis[:, None]


class _Reducer:
    """Accumulates the per-query statistics over key blocks of a probability pattern."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        q_pos: Tensor,
        *,
        sink_size: int,
        recent_window: int | None,
        spans: Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        device = q_pos.device
        self.q_pos = q_pos  # [qc]
        self.sink_size = sink_size
        self.recent_window = recent_window
        self.spans = spans  # [batch or 1, n_spans, 2]
        self.entropy = torch.zeros(shape, dtype=dtype, device=device)  # [batch, heads, qc]
        self.max_prob = torch.zeros(shape, dtype=dtype, device=device)
        self.best = torch.full(shape, -math.inf, dtype=dtype, device=device)  # argmax criterion
        self.argmax = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.sink = torch.zeros(shape, dtype=dtype, device=device)
        self.outside = None if recent_window is None else torch.zeros_like(self.sink)
        self.span = None
        if spans is not None:
            self.span = torch.zeros(*shape, spans.shape[1], dtype=dtype, device=device)

    def update(self, p: Tensor, key_idx: Tensor, criterion: Tensor | None = None) -> None:
        """Fold in probabilities ``p`` [batch, heads, qc, kc] (0 where not visible) of keys
        ``key_idx`` [kc]. ``criterion`` (same shape, -inf where not visible) decides the argmax;
        by default the probabilities themselves (with 0 meaning "not a candidate")."""
        if criterion is None:
            criterion = torch.where(p > 0, p, -math.inf)
        self.entropy -= torch.where(p > 0, p * torch.log(p), 0.0).sum(-1)
        self.max_prob = torch.maximum(self.max_prob, p.amax(-1))
        # torch.max returns the first maximal index; strict '>' keeps earlier blocks on ties.
        best, arg = criterion.max(-1)
        better = best > self.best
        self.best = torch.where(better, best, self.best)
        self.argmax = torch.where(better, arg + key_idx[0], self.argmax)
        self.sink += p[..., key_idx < self.sink_size].sum(-1)
        if self.outside is not None:
            outside = (key_idx[None, :] >= self.sink_size) & (
                key_idx[None, :] <= self.q_pos[:, None] - self.recent_window
            )  # [qc, kc]
            self.outside += (p * outside).sum(-1)
        if self.span is not None:
            start, end = self.spans[..., 0:1], self.spans[..., 1:2]  # [batch or 1, n_spans, 1]
            inside = (key_idx >= start) & (key_idx < end)  # [batch or 1, n_spans, kc]
            self.span += torch.einsum("bhqk,bnk->bhqn", p, inside.to(p.dtype))

    def finish(self) -> dict[str, Tensor | None]:
        return {
            "entropy": self.entropy,
            "max_prob": self.max_prob,
            "argmax": self.argmax,
            "sink_mass": self.sink,
            "span_mass": self.span,
            "outside_mass": self.outside,
        }


# ---------------------------------------------------------------------------------------------
# References.


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scores(q: Tensor, k: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """q [batch, n_heads, qc, d] · k [batch, n_kv, kc, d] -> scores [batch, n_heads, qc, kc],
    without repeating k: query heads are grouped by the kv head they read."""
    batch, n_heads, qc, d = q.shape
    n_kv, kc = k.shape[1], k.shape[2]
    qg = q.to(dtype).reshape(batch, n_kv, n_heads // n_kv, qc, d)  # [b, kv, group, qc, d]
    s = qg @ k.to(dtype)[:, :, None].transpose(-1, -2)  # [b, kv, group, qc, kc]
    return s.reshape(batch, n_heads, qc, kc) * scale


def _logits(
    q: Tensor, k: Tensor, a: _Args, key_idx: Tensor, q_pos: Tensor, dtype: torch.dtype
) -> Tensor:
    """The logits of q [batch, n_heads, qc, d] against the keys ``key_idx`` [kc] in k
    [batch, n_kv, kc, d]: scaled scores, softcap, ALiBi (module docstring).

    Returns [batch, n_heads, qc, kc] in ``dtype``.
    """
    s = _scores(q, k, a.scale, dtype)
    if a.softcap is not None:
        s = torch.tanh(s / a.softcap) * a.softcap
    if a.alibi_slopes is not None:
        distance = (key_idx[None, :] - q_pos[:, None]).to(dtype)  # [qc, kc], j - p_i
        s = s + a.alibi_slopes.to(dtype)[:, None, None] * distance
    return s


def _pv(p: Tensor, v: Tensor) -> Tensor:
    """p [batch, n_heads, qc, kc] @ v [batch, n_kv, kc, dv] -> [batch, n_heads, qc, dv]."""
    batch, n_heads, qc, kc = p.shape
    n_kv = v.shape[1]
    out = p.reshape(batch, n_kv, n_heads // n_kv, qc, kc) @ v.to(p.dtype)[:, :, None]
    return out.reshape(batch, n_heads, qc, v.shape[-1])


def _lse(q: Tensor, k: Tensor, a: _Args, causal: bool, chunk: int, dtype: torch.dtype) -> Tensor:
    """Log-sum-exp of the visible logits and the learned sink, [batch, n_heads, q_len], chunked
    over q and k."""
    batch, n_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    lse = torch.full((batch, n_heads, q_len), -math.inf, dtype=dtype, device=q.device)
    for q0 in range(0, q_len, chunk):
        q_pos = a.q_positions[q0 : q0 + chunk]
        for k0 in range(0, k_len, chunk):
            key_idx = torch.arange(k0, min(k0 + chunk, k_len), device=q.device)
            s = _logits(q[:, :, q0 : q0 + chunk], k[:, :, k0 : k0 + chunk], a, key_idx, q_pos,
                        dtype)  # fmt: skip
            s = s.masked_fill(~_visible(key_idx, q_pos, a, k_len, causal=causal), -math.inf)
            lse[:, :, q0 : q0 + chunk] = torch.logaddexp(
                lse[:, :, q0 : q0 + chunk], torch.logsumexp(s, dim=-1)
            )
    if a.sinks is not None:
        lse = torch.logaddexp(lse, a.sinks.to(dtype)[None, :, None])
    return lse


def _learned_sink(entropy: Tensor, sink_prob: Tensor) -> tuple[Tensor, Tensor]:
    """The entropy with the learned sink's ``-P_z log P_z`` added, and ``P_z`` itself."""
    term = torch.where(sink_prob > 0, sink_prob * torch.log(sink_prob), 0.0)
    return entropy - term, sink_prob


def attention_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    sink_size: int = 1,
    recent_window: int | None = None,
    spans: SpansLike | None = None,
    q_positions: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    return_output: bool = False,
    chunk_size: int = 512,
) -> AttentionStats:
    """Reference for `kernels.attention_stats` (same arguments; see that function).

    Two passes over key chunks: the log-sum-exp, then the probabilities with the final lse
    folded into the statistics. Every key chunk is visited (the kernels skip the ones a window
    or chunk hides). Memory O(batch · n_heads · chunk_size²).
    """
    check_qk(q, k, v)
    if return_output and v is None:
        raise ValueError("return_output=True needs v")
    a = check_args(
        q,
        k,
        scale=scale,
        q_positions=q_positions,
        key_padding_mask=key_padding_mask,
        spans=spans,
        sink_size=sink_size,
        recent_window=recent_window,
        window=window,
        chunk=chunk,
        softcap=softcap,
        sinks=sinks,
        alibi_slopes=alibi_slopes,
    )
    dtype = _acc_dtype(q)
    batch, n_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    if q_len == 0:
        return _empty_stats(q, v, a, recent_window, return_output, dtype)
    lse = _lse(q, k, a, causal, chunk_size, dtype)  # [batch, n_heads, q_len]

    parts: list[dict[str, Tensor | None]] = []
    outputs: list[Tensor] = []
    for q0 in range(0, q_len, chunk_size):
        q_pos = a.q_positions[q0 : q0 + chunk_size]
        q_blk = q[:, :, q0 : q0 + chunk_size]
        lse_blk = lse[:, :, q0 : q0 + chunk_size, None]  # [batch, n_heads, qc, 1]
        red = _Reducer(
            (batch, n_heads, q_pos.shape[0]),
            q_pos,
            sink_size=sink_size,
            recent_window=recent_window,
            spans=a.spans,
            dtype=dtype,
        )
        acc = None
        if return_output:
            acc = torch.zeros(
                batch, n_heads, q_pos.shape[0], v.shape[-1], dtype=dtype, device=q.device
            )
        for k0 in range(0, k_len, chunk_size):
            key_idx = torch.arange(k0, min(k0 + chunk_size, k_len), device=q.device)
            s = _logits(q_blk, k[:, :, k0 : k0 + chunk_size], a, key_idx, q_pos, dtype)
            vis = _visible(key_idx, q_pos, a, k_len, causal=causal)
            s = s.masked_fill(~vis, -math.inf)  # [batch, n_heads, qc, kc]
            p = torch.where(vis, torch.exp(s - lse_blk), 0.0)
            red.update(p, key_idx, criterion=s)
            if acc is not None:
                acc += _pv(p, v[:, :, k0 : k0 + chunk_size])
        parts.append(red.finish())
        if acc is not None:
            outputs.append(acc)

    def cat(name: str) -> Tensor | None:
        if parts[0][name] is None:
            return None
        return torch.cat([p[name] for p in parts], dim=2)

    entropy, learned = cat("entropy"), None
    if a.sinks is not None:
        entropy, learned = _learned_sink(entropy, torch.exp(a.sinks.to(dtype)[:, None] - lse))
    return AttentionStats(
        lse=lse,
        entropy=entropy,
        max_prob=cat("max_prob"),
        argmax=cat("argmax"),
        sink_mass=cat("sink_mass"),
        span_mass=cat("span_mass"),
        outside_mass=cat("outside_mass"),
        output=torch.cat(outputs, dim=2).to(v.dtype) if return_output else None,
        learned_sink_mass=learned,
    )


def _empty_stats(
    q: Tensor,
    v: Tensor | None,
    a: _Args,
    recent_window: int | None,
    return_output: bool,
    dtype: torch.dtype,
) -> AttentionStats:
    batch, n_heads, q_len, _ = q.shape
    z = q.new_zeros((batch, n_heads, q_len), dtype=dtype)
    return AttentionStats(
        lse=z.clone(),
        entropy=z.clone(),
        max_prob=z.clone(),
        argmax=z.long(),
        sink_mass=z.clone(),
        span_mass=None if a.spans is None else z.new_zeros(*z.shape, a.spans.shape[1]),
        outside_mass=None if recent_window is None else z.clone(),
        output=q.new_zeros((batch, n_heads, q_len, v.shape[-1]), dtype=v.dtype)
        if return_output
        else None,
        learned_sink_mass=None if a.sinks is None else z.clone(),
    )


def received_attention(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_positions: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    query_mask: Tensor | None = None,
    chunk_size: int = 512,
) -> Tensor:
    """Reference for `kernels.received_attention`: column sums ``Σ_i P_ij`` over selected
    queries, [batch, n_heads, k_len] fp32 (fp64 for fp64 inputs). ``sinks`` is only checked:
    ``lse`` already holds the learned sinks."""
    check_qk(q, k)
    a = check_args(
        q, k, scale=scale, q_positions=q_positions, key_padding_mask=key_padding_mask,
        window=window, chunk=chunk, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    batch, n_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    check_lse_and_query_mask(lse, query_mask, batch, n_heads, q_len)
    dtype = _acc_dtype(q)
    lse = lse.to(dtype)
    if query_mask is not None:
        lse = lse.masked_fill(~query_mask.to(q.device)[:, None, :], math.inf)
    out = torch.zeros(batch, n_heads, k_len, dtype=dtype, device=q.device)
    for k0 in range(0, k_len, chunk_size):
        key_idx = torch.arange(k0, min(k0 + chunk_size, k_len), device=q.device)
        for q0 in range(0, q_len, chunk_size):
            q_pos = a.q_positions[q0 : q0 + chunk_size]
            s = _logits(q[:, :, q0 : q0 + chunk_size], k[:, :, k0 : k0 + chunk_size], a, key_idx,
                        q_pos, dtype)  # fmt: skip
            vis = _visible(key_idx, q_pos, a, k_len, causal=causal)
            lse_blk = lse[:, :, q0 : q0 + chunk_size, None]
            vis = vis & torch.isfinite(lse_blk)  # unselected (+inf) and fully masked (-inf) rows
            p = torch.where(vis, torch.exp(s - lse_blk), 0.0)  # [batch, n_heads, qc, kc]
            out[:, :, k0 : k0 + chunk_size] += p.sum(2)
    return out


def check_lse_and_query_mask(
    lse: Tensor, query_mask: Tensor | None, batch: int, n_heads: int, q_len: int
) -> None:
    """Raise ValueError unless lse is [batch, n_heads, q_len] and query_mask bool [batch, q_len]."""
    if lse.shape != (batch, n_heads, q_len):
        raise ValueError(
            f"lse must be [batch={batch}, n_heads={n_heads}, q_len={q_len}], got {_shape(lse)}"
        )
    if query_mask is not None and (
        query_mask.shape != (batch, q_len) or query_mask.dtype != torch.bool
    ):
        raise ValueError(
            f"query_mask must be bool [batch={batch}, q_len={q_len}], "
            f"got {query_mask.dtype} {_shape(query_mask)}"
        )


def top_keys(
    q: Tensor,
    k: Tensor,
    lse: Tensor | None = None,
    *,
    k_top: int,
    causal: bool = True,
    scale: float | None = None,
    q_positions: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    chunk: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    chunk_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """Reference for `kernels.top_keys`: the ``k_top`` keys each query attends to most.

    Args:
        q, k, causal, scale, q_positions, key_padding_mask, window, chunk, softcap, sinks,
            alibi_slopes: as for `attention_stats`.
        lse: ``[batch, n_heads, q_len]`` log-sum-exp of each row, as `attention_stats` returns
            it for the same arguments; None computes it here (one more pass over the keys).
        k_top: how many keys per query, any integer >= 1 (the Triton kernel takes powers of two
            up to 16).

    Returns:
        ``(probabilities, indices)``, each ``[batch, n_heads, q_len, k_top]``: fp32 (fp64 for
        fp64 inputs) and int64, largest first; padding (fewer visible keys than ``k_top``) has
        probability 0 and index -1. Definition and tie rule in the module docstring.

    Chunked over queries and keys, a running top-k merged with each key chunk that some query
    of the chunk sees: memory O(batch · n_heads · chunk_size²), never an L×L tensor.
    """
    check_qk(q, k)
    if isinstance(k_top, bool) or not isinstance(k_top, numbers.Integral) or k_top < 1:
        raise ValueError(f"k_top must be an integer >= 1, got {k_top!r}")
    a = check_args(
        q, k, scale=scale, q_positions=q_positions, key_padding_mask=key_padding_mask,
        window=window, chunk=chunk, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    batch, n_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    dtype = _acc_dtype(q)
    if lse is None:
        lse = _lse(q, k, a, causal, chunk_size, dtype)
    else:
        check_lse_and_query_mask(lse, None, batch, n_heads, q_len)
        lse = lse.to(device=q.device, dtype=dtype)
    logits = torch.full((batch, n_heads, q_len, k_top), -math.inf, dtype=dtype, device=q.device)
    index = torch.full((batch, n_heads, q_len, k_top), -1, dtype=torch.int64, device=q.device)
    for q0 in range(0, q_len, chunk_size):
        q_pos = a.q_positions[q0 : q0 + chunk_size]
        q_blk = q[:, :, q0 : q0 + chunk_size]
        best = logits[:, :, q0 : q0 + chunk_size, :0]  # the running top-k, largest first
        best_idx = index[:, :, q0 : q0 + chunk_size, :0]
        first, end = key_range(q_pos, k_len, causal=causal, window=a.window, chunk=a.chunk,
                               chunk_start=a.chunk_start)  # fmt: skip
        # only the key chunks some query of this chunk sees (half of them, causally)
        for k0 in range(int(first.min()) // chunk_size * chunk_size, int(end.max()), chunk_size):
            key_idx = torch.arange(k0, min(k0 + chunk_size, k_len), device=q.device)
            s = _logits(q_blk, k[:, :, k0 : k0 + chunk_size], a, key_idx, q_pos, dtype)
            s = s.masked_fill(~_visible(key_idx, q_pos, a, k_len, causal=causal), -math.inf)
            # earlier candidates first: every key index in ``best`` is below this chunk's
            candidates = torch.cat([best, s], -1)
            candidate_idx = torch.cat([best_idx, key_idx.expand_as(s)], -1)
            best, where = _largest(candidates, min(k_top, candidates.shape[-1]))
            best_idx = candidate_idx.gather(-1, where)
        n = best.shape[-1]
        logits[:, :, q0 : q0 + chunk_size, :n] = best
        index[:, :, q0 : q0 + chunk_size, :n] = best_idx
    live = logits > -math.inf  # a visible key (masked keys and padding have -inf)
    probs = torch.where(live, torch.exp(logits - lse[..., None]), 0.0)
    return probs, torch.where(live, index, -1)


def _largest(values: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` largest entries along the last dim, largest first, equal values in the order
    they stand in ``values``: ``(values, positions)``, each ``[..., n]``.

    ``torch.topk`` gives the values but no documented order among equal ones, so it only finds
    the n-th largest value; every entry above it is taken, and of those equal to it the first
    ones until n are taken.
    """
    nth = values.topk(n, dim=-1).values[..., -1:]  # [..., 1]
    above = values > nth
    tied = values == nth
    room = n - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= room))  # exactly n per row
    positions = chosen.nonzero()[:, -1].view(*values.shape[:-1], n)  # increasing per row
    picked = values.gather(-1, positions)
    order = picked.sort(dim=-1, descending=True, stable=True).indices
    return picked.gather(-1, order), positions.gather(-1, order)


def stats_from_pattern(
    pattern: Tensor,
    *,
    sink_size: int = 1,
    recent_window: int | None = None,
    spans: SpansLike | None = None,
    q_positions: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    chunk: int | None = None,
    learned_sinks: bool = False,
    chunk_size: int = 4096,
) -> AttentionStats:
    """The statistics of a materialised probability pattern [batch, n_heads, q_len, k_len].

    Same definitions as `attention_stats` (module docstring); ``lse`` and ``output`` are None.
    Entries at keys that are not visible are ignored: padding keys (``key_padding_mask``
    False) and, with ``causal=True``, ``window`` or ``chunk``, keys the mask hides. Without them
    the pattern's own zeros do the masking -- but eager attention spreads a fully masked row
    (a left-padding query) uniformly over all keys, so pass the model's ``causal``, ``window``
    and ``chunk`` for models with padding. A row with no positive visible entry counts as fully
    masked. The argmax is taken over probabilities (ties: smallest key index).

    ``learned_sinks=True``: the pattern comes from a model with learned sink logits (gpt-oss),
    whose eager attention drops the sink's column, so each row's missing mass
    ``1 - Σ_visible P_ij`` (clamped to [0, 1]) is ``learned_sink_mass``, and its
    ``-P_z log P_z`` joins the entropy, as in `attention_stats` with ``sinks``.
    """
    if pattern.ndim != 4:
        raise ValueError(
            f"pattern must be [batch, n_heads, q_len, k_len], got shape {_shape(pattern)}"
        )
    batch, n_heads, q_len, k_len = pattern.shape
    dummy_q = pattern.new_empty((batch, n_heads, q_len, 1))
    dummy_k = pattern.new_empty((batch, 1, k_len, 1))
    a = check_args(
        dummy_q,
        dummy_k,
        scale=1.0,
        q_positions=q_positions,
        key_padding_mask=key_padding_mask,
        spans=spans,
        sink_size=sink_size,
        recent_window=recent_window,
        window=window,
        chunk=chunk,
    )
    dtype = _acc_dtype(pattern)
    kept = torch.zeros(batch, n_heads, q_len, dtype=dtype, device=pattern.device)
    red = _Reducer(
        (batch, n_heads, q_len),
        a.q_positions,
        sink_size=sink_size,
        recent_window=recent_window,
        spans=a.spans,
        dtype=dtype,
    )
    for k0 in range(0, k_len, chunk_size):
        key_idx = torch.arange(k0, min(k0 + chunk_size, k_len), device=pattern.device)
        p = pattern[..., k0 : k0 + chunk_size].to(dtype)
        p = p * _visible(key_idx, a.q_positions, a, k_len, causal=causal)
        red.update(p, key_idx)
        kept += p.sum(-1)
    stats = red.finish()
    if learned_sinks:
        stats["entropy"], stats["learned_sink_mass"] = _learned_sink(
            stats["entropy"], (1 - kept).clamp(0, 1)
        )
    return AttentionStats(lse=None, **stats)
