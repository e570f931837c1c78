"""Per-query attention statistics in one streamed pass (FlashAttention-style forward).

`attention_stats` computes, for every (batch, head, query), the log-sum-exp, the entropy, the
maximum probability and its key index, the mass on the first ``sink_size`` keys, the mass on
given key spans and the mass outside sinks + a recent window -- and, on request, the attention
output itself -- without forming the L×L pattern. The definitions live in `kernels.reference`.

Kernel layout
-------------
One program per (query block of ``BLOCK_M`` rows, batch × head). It walks the key blocks once,
keeping per row, in base-2 units (``s2 = s · log2 e``):

- ``m``: running max of ``s2``; ``l = Σ 2^{s2 - m}``; ``u = Σ 2^{s2 - m} (s2 - m)``, rescaled by
  ``α = 2^{m - m'}`` as ``u ← α (u + (m - m') l)`` when the max grows. Then ``lse = ln2 (m +
  log2 l)``, ``H = ln l - ln2 · u / l`` and ``max_prob = 1 / l``.
- ``arg``: the key index of the running max (a block only replaces it on a strictly larger max,
  so ties keep the smallest index).
- ``acc``: ``Σ 2^{s2 - m} v`` when the output is requested (rescaled by ``α`` like FlashAttention).

The key blocks every row of the query block sees in full (left of the causal diagonal, inside
``k_len``, no padding) take a loop without masks; the rest take a masked loop. The sink, span and
recent-window masses touch few keys, so they are not accumulated in the main loop: after it, the
final ``m`` and ``l`` are known and a short second walk over just those key blocks sums
``2^{s2 - m}`` over each set. Outside mass is ``1 - sink - recent`` for causal attention (the
recent window is the short range), and summed directly for bidirectional attention.

Grouped-query attention reads kv head ``h // group`` with plain pointer offsets (no repeated K).
Query blocks are launched heaviest first, which shortens the tail of causal grids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels import reference
from kernels.reference import AttentionStats, SpansLike, check_args, check_qk

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

__all__ = ["attention_stats"]

_LOG2E = 1.4426950408889634


def _use_triton(backend: str, q: Tensor) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return triton is not None and q.is_cuda
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package")
    if not q.is_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "first imported (Triton's CPU interpreter)"
        )
    return True


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's CPU interpreter."""
    return triton is not None and type(_stats_fwd).__name__ == "InterpretedFunction"


def block_sizes(d_head: int, on_gpu: bool, with_output: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the stats kernel.

    Statistics only: the fastest of ``python -m kernels.bench --sweep 16384`` on an H100. With
    the output, the [BLOCK_M, d] accumulator wants 8 warps: at d=128 the 4-warp configuration
    ran 1.3-1.6x slower there, at d=64 within 6% (docs/benchmarks.md). The interpreter gets
    small blocks so that tests at a few hundred tokens still cross several blocks.
    """
    if not on_gpu:
        return 32, 32, 4, 1
    if with_output:
        return (128, 128, 8, 3) if d_head <= 64 else (128, 64, 8, 3)
    return (64, 64, 4, 3) if d_head <= 64 else (128, 64, 4, 3)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def _load_rows(ptrs, offs_d, d: tl.constexpr):
        """Load a [rows, BLOCK_D] tile whose rows are all in range; mask only padded columns."""
        if offs_d.shape[0] == d:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=offs_d[None, :] < d, other=0.0)

    @triton.jit
    def _scores(
        q,
        K_head,
        start_n,
        offs_n_base,
        offs_d,
        k_len,
        stride_kn,
        stride_kd,
        d_head: tl.constexpr,
        qpos,
        pad_row,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Unscaled products q·k of one key block, -inf where not visible: [BLOCK_M, BLOCK_N].

        Callers scale by ``qk_scale > 0`` (base-2 units) fused with the max subtraction, one FMA
        per score, as in the Triton fused-attention tutorial."""
        offs_n = start_n + offs_n_base  # [BLOCK_N]
        k_ptrs = K_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        if MASKED:
            k = tl.load(
                k_ptrs, mask=(offs_n[:, None] < k_len) & (offs_d[None, :] < d_head), other=0.0
            )
        else:
            k = _load_rows(k_ptrs, offs_d, d_head)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            vis = offs_n[None, :] < k_len
            if CAUSAL:
                vis = vis & (offs_n[None, :] <= qpos[:, None])
            if HAS_PAD:
                real = tl.load(pad_row + offs_n, mask=offs_n < k_len, other=0)
                vis = vis & (real[None, :] != 0)
            s = tl.where(vis, s, -float("inf"))
        return s

    @triton.jit
    def _main_block(
        q,
        K_head,
        V_head,
        start_n,
        offs_n_base,
        offs_d,
        offs_dv,
        k_len,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        d_head: tl.constexpr,
        d_v: tl.constexpr,
        qpos,
        pad_row,
        qk_scale,
        m_i,
        l_i,
        u_i,
        arg_i,
        acc,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        RETURN_OUTPUT: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Fold one key block into the running (m, l, u, arg, acc) of the query block."""
        s = _scores(
            q,
            K_head,
            start_n,
            offs_n_base,
            offs_d,
            k_len,
            stride_kn,
            stride_kd,
            d_head,
            qpos,
            pad_row,
            MASKED,
            CAUSAL,
            HAS_PAD,
            DOT_PREC,
        )
        # the max commutes with the positive scale; ties: smallest index
        m_raw, idx_blk = tl.max(s, axis=1, return_indices=True)
        m_blk = m_raw * qk_scale
        arg_i = tl.where(m_blk > m_i, start_n + idx_blk, arg_i)
        m_new = tl.maximum(m_i, m_blk)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.math.exp2(m_i - m_safe)
        shift = tl.where(l_i > 0, m_i - m_safe, 0.0)
        d = s * qk_scale - m_safe[:, None]  # [BLOCK_M, BLOCK_N], <= 0
        p = tl.math.exp2(d)
        # masked keys: 0 · finite, not 0 · -inf
        pd = p * tl.maximum(d, -3.0e38) if MASKED else p * d
        u_i = alpha * (u_i + shift * l_i) + tl.sum(pd, axis=1)
        l_i = alpha * l_i + tl.sum(p, axis=1)
        if RETURN_OUTPUT:
            offs_n = start_n + offs_n_base
            v_ptrs = V_head + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
            if MASKED:
                v = tl.load(
                    v_ptrs, mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < d_v), other=0.0
                )
            else:
                v = _load_rows(v_ptrs, offs_dv, d_v)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return m_new, l_i, u_i, arg_i, acc

    @triton.jit
    def _range_sum(
        q,
        K_head,
        lo,
        hi,
        offs_n_base,
        offs_d,
        k_len,
        stride_kn,
        stride_kd,
        d_head: tl.constexpr,
        qpos,
        pad_row,
        qk_scale,
        m_safe,
        row_lo,
        row_hi,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Σ 2^{s2 - m} over visible keys j with row_lo <= j < row_hi ([BLOCK_M] bounds), walking
        the key blocks that cover [lo, hi)."""
        c = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            s = _scores(
                q,
                K_head,
                start_n,
                offs_n_base,
                offs_d,
                k_len,
                stride_kn,
                stride_kd,
                d_head,
                qpos,
                pad_row,
                True,
                CAUSAL,
                HAS_PAD,
                DOT_PREC,
            )
            offs_n = start_n + offs_n_base
            keep = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
            p = tl.math.exp2(s * qk_scale - m_safe[:, None])
            c += tl.sum(tl.where(keep, p, 0.0), axis=1)
        return c

    @triton.jit
    def _stats_fwd(
        Q,
        K,
        V,
        QPOS,
        PAD,
        SPANS,
        LSE,
        ENT,
        MAXP,
        ARG,
        SINK,
        OUTSIDE,
        SPAN_MASS,
        OUT,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        stride_pad_b,
        stride_span_b,
        n_heads,
        group,
        q_len,
        k_len,
        n_spans,
        sink_size,
        recent_window,
        qk_scale,
        d_head: tl.constexpr,
        d_v: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        HAS_OUTSIDE: tl.constexpr,
        RETURN_OUTPUT: tl.constexpr,
        DEFAULT_POS: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (causal) blocks first
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        kv_h = h // group  # GQA: the HF repeat_kv rule

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_n_base = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < q_len
        # [BLOCK_M] absolute key positions; by default the last q_len keys (no tensor needed)
        if DEFAULT_POS:
            qpos = tl.where(row_ok, offs_m + (k_len - q_len), -1)
        else:
            qpos = tl.load(QPOS + offs_m, mask=row_ok, other=-1).to(tl.int32)

        q_ptrs = (
            Q
            + b.to(tl.int64) * stride_qb
            + h.to(tl.int64) * stride_qh
            + offs_m[:, None] * stride_qm
            + offs_d[None, :] * stride_qd
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < d_head), other=0.0)
        K_head = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
        V_head = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
        pad_row = PAD + b.to(tl.int64) * stride_pad_b

        # Key range: causal rows see keys <= their position; unmasked blocks are those every
        # row of this query block sees in full.
        if CAUSAL:
            hi = tl.minimum(tl.max(qpos, axis=0) + 1, k_len)
            min_pos = tl.min(tl.where(row_ok, qpos, k_len), axis=0)
            full_hi = tl.minimum(min_pos + 1, k_len)
        else:
            hi = k_len
            full_hi = k_len
        unmasked_hi = 0 if HAS_PAD else (full_hi // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        arg_i = tl.full([BLOCK_M], -1, dtype=tl.int32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start_n in range(0, unmasked_hi, BLOCK_N):
            m_i, l_i, u_i, arg_i, acc = _main_block(
                q,
                K_head,
                V_head,
                start_n,
                offs_n_base,
                offs_d,
                offs_dv,
                k_len,
                stride_kn,
                stride_kd,
                stride_vn,
                stride_vd,
                d_head,
                d_v,
                qpos,
                pad_row,
                qk_scale,
                m_i,
                l_i,
                u_i,
                arg_i,
                acc,
                False,
                CAUSAL,
                HAS_PAD,
                RETURN_OUTPUT,
                DOT_PREC,
            )
        for start_n in range(unmasked_hi, hi, BLOCK_N):
            m_i, l_i, u_i, arg_i, acc = _main_block(
                q,
                K_head,
                V_head,
                start_n,
                offs_n_base,
                offs_d,
                offs_dv,
                k_len,
                stride_kn,
                stride_kd,
                stride_vn,
                stride_vd,
                d_head,
                d_v,
                qpos,
                pad_row,
                qk_scale,
                m_i,
                l_i,
                u_i,
                arg_i,
                acc,
                True,
                CAUSAL,
                HAS_PAD,
                RETURN_OUTPUT,
                DOT_PREC,
            )

        valid = l_i > 0
        l_safe = tl.where(valid, l_i, 1.0)
        m_safe = tl.where(valid, m_i, 0.0)
        ln2 = 0.6931471805599453
        row = (b * n_heads + h).to(tl.int64) * q_len + offs_m  # [BLOCK_M] into [B, H, q_len]
        tl.store(
            LSE + row,
            tl.where(valid, (m_i + tl.math.log2(l_safe)) * ln2, -float("inf")),
            mask=row_ok,
        )
        tl.store(ENT + row, tl.where(valid, tl.log(l_safe) - ln2 * u_i / l_safe, 0.0), mask=row_ok)
        tl.store(MAXP + row, tl.where(valid, 1.0 / l_safe, 0.0), mask=row_ok)
        tl.store(ARG + row, tl.where(valid, arg_i, -1).to(tl.int64), mask=row_ok)
        if RETURN_OUTPUT:
            out = tl.where(valid[:, None], acc / l_safe[:, None], 0.0)
            o_ptrs = (
                OUT
                + b.to(tl.int64) * stride_ob
                + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om
                + offs_dv[None, :] * stride_od
            )
            tl.store(
                o_ptrs,
                out.to(OUT.dtype.element_ty),
                mask=row_ok[:, None] & (offs_dv[None, :] < d_v),
            )

        # Second, short walk with the final max: sinks, spans, recent window.
        zero = tl.zeros([BLOCK_M], dtype=tl.int32)
        c_sink = _range_sum(
            q,
            K_head,
            0,
            tl.minimum(sink_size, hi),
            offs_n_base,
            offs_d,
            k_len,
            stride_kn,
            stride_kd,
            d_head,
            qpos,
            pad_row,
            qk_scale,
            m_safe,
            zero,
            zero + sink_size,
            CAUSAL,
            HAS_PAD,
            DOT_PREC,
            BLOCK_M,
            BLOCK_N,
        )
        tl.store(SINK + row, tl.where(valid, c_sink / l_safe, 0.0), mask=row_ok)
        if HAS_OUTSIDE:
            if CAUSAL:
                # recent = visible keys j >= S with j > pos - W; outside = total - sink - recent
                row_lo = tl.maximum(qpos - recent_window + 1, sink_size)
                lo = tl.maximum(min_pos - recent_window + 1, sink_size)
                c_recent = _range_sum(
                    q,
                    K_head,
                    lo,
                    hi,
                    offs_n_base,
                    offs_d,
                    k_len,
                    stride_kn,
                    stride_kd,
                    d_head,
                    qpos,
                    pad_row,
                    qk_scale,
                    m_safe,
                    row_lo,
                    zero + k_len,
                    CAUSAL,
                    HAS_PAD,
                    DOT_PREC,
                    BLOCK_M,
                    BLOCK_N,
                )
                outside = tl.maximum(l_i - c_sink - c_recent, 0.0)
            else:
                row_hi = qpos - recent_window + 1
                hi_out = tl.minimum(tl.max(qpos, axis=0) - recent_window + 1, k_len)
                outside = _range_sum(
                    q,
                    K_head,
                    sink_size,
                    hi_out,
                    offs_n_base,
                    offs_d,
                    k_len,
                    stride_kn,
                    stride_kd,
                    d_head,
                    qpos,
                    pad_row,
                    qk_scale,
                    m_safe,
                    zero + sink_size,
                    row_hi,
                    CAUSAL,
                    HAS_PAD,
                    DOT_PREC,
                    BLOCK_M,
                    BLOCK_N,
                )
            tl.store(OUTSIDE + row, tl.where(valid, outside / l_safe, 0.0), mask=row_ok)
        span_base = SPANS + b.to(tl.int64) * stride_span_b
        for n in range(0, n_spans):
            start = tl.load(span_base + 2 * n).to(tl.int32)
            end = tl.load(span_base + 2 * n + 1).to(tl.int32)
            c_span = _range_sum(
                q,
                K_head,
                tl.maximum(start, 0),
                tl.minimum(end, hi),
                offs_n_base,
                offs_d,
                k_len,
                stride_kn,
                stride_kd,
                d_head,
                qpos,
                pad_row,
                qk_scale,
                m_safe,
                zero + start,
                zero + end,
                CAUSAL,
                HAS_PAD,
                DOT_PREC,
                BLOCK_M,
                BLOCK_N,
            )
            tl.store(
                SPAN_MASS + row * n_spans + n, tl.where(valid, c_span / l_safe, 0.0), mask=row_ok
            )


def _next_pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _triton_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    a: reference._Args,
    *,
    causal: bool,
    sink_size: int,
    recent_window: int | None,
    return_output: bool,
    config: tuple[int, int, int, int] | None = None,
) -> AttentionStats:
    """Launch the kernel on validated arguments; ``config`` overrides `block_sizes`.

    The host side is a handful of allocations and one launch, no other kernels and no sync: at
    4K tokens the whole pass takes a few hundred microseconds, so every extra torch op shows.
    """
    batch, n_heads, q_len, d_head = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    dev = q.device
    n_f32 = 5 if recent_window is not None else 4
    # lse, entropy, max_prob, sink (, outside): each [batch, n_heads, q_len], one allocation
    fields = torch.empty(n_f32, batch, n_heads, q_len, dtype=torch.float32, device=dev).unbind(0)
    lse, ent, maxp, sink = fields[:4]
    outside = fields[4] if recent_window is not None else None
    arg = torch.empty(batch, n_heads, q_len, dtype=torch.int64, device=dev)
    n_spans = 0 if a.spans is None else a.spans.shape[1]
    span_mass = (
        torch.empty(batch, n_heads, q_len, n_spans, dtype=torch.float32, device=dev)
        if n_spans
        else None
    )
    out = None
    d_v = d_head if v is None else v.shape[-1]
    if return_output:
        # written in [batch, q_len, n_heads, d_v] memory order, the layout attention modules
        # hand on (their transpose(1, 2).contiguous() is then free)
        out = torch.empty(batch, q_len, n_heads, d_v, dtype=v.dtype, device=dev).transpose(1, 2)
    if q_len == 0:
        return AttentionStats(lse, ent, maxp, arg, sink, span_mass, outside, out)
    pad = a.key_padding_mask
    if pad is not None:
        pad = pad.view(torch.int8) if pad.stride(1) == 1 else pad.contiguous().view(torch.int8)
    vv = v if v is not None else k  # unread dummy when no output is requested
    oo = out if out is not None else q  # unwritten dummy
    block_m, block_n, warps, stages = config or block_sizes(d_head, q.is_cuda, return_output)
    grid = (triton.cdiv(q_len, block_m), batch * n_heads)
    _stats_fwd[grid](
        q,
        k,
        vv,
        lse if a.q_positions is None else a.q_positions,  # unread with default positions
        pad if pad is not None else lse,  # unread dummy
        a.spans if n_spans else lse,
        lse,
        ent,
        maxp,
        arg,
        sink,
        outside if outside is not None else lse,
        span_mass if span_mass is not None else lse,
        oo,
        *q.stride(),
        *k.stride(),
        *vv.stride(),
        *oo.stride(),
        pad.stride(0) if pad is not None else 0,
        a.spans.stride(0) if n_spans and a.spans.shape[0] > 1 else 0,
        n_heads,
        n_heads // n_kv,
        q_len,
        k_len,
        n_spans,
        sink_size,
        recent_window or 1,
        a.scale * _LOG2E,
        d_head=d_head,
        d_v=d_v,
        CAUSAL=causal,
        HAS_PAD=pad is not None,
        HAS_OUTSIDE=recent_window is not None,
        RETURN_OUTPUT=return_output,
        DEFAULT_POS=a.q_positions is None,
        DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_next_pow2(d_head),
        BLOCK_DV=_next_pow2(d_v),
        num_warps=warps,
        num_stages=stages,
    )
    return AttentionStats(lse, ent, maxp, arg, sink, span_mass, outside, out)


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
    return_output: bool = False,
    backend: str = "auto",
) -> AttentionStats:
    """Per-(batch, head, query) attention statistics without forming the attention pattern.

    Args:
        q: ``[batch, n_heads, q_len, d_head]``, fp32/fp16/bf16 (fp32 accumulation).
        k: ``[batch, n_kv_heads, k_len, d_head]``; ``n_heads % n_kv_heads == 0`` (GQA: query head
            ``h`` reads kv head ``h // (n_heads // n_kv_heads)``).
        v: ``[batch, n_kv_heads, k_len, d_v]``; needed only with ``return_output``.
        causal: mask keys after each query's position.
        scale: score scale, default ``d_head ** -0.5``; must be positive.
        sink_size: S; ``sink_mass`` is the mass on keys ``j < S``.
        recent_window: W; ``outside_mass`` is the mass on keys ``S <= j <= pos - W``. None skips it.
        spans: ``[n_spans, 2]`` or ``[batch, n_spans, 2]`` ``[start, end)`` key ranges.
        q_positions: ``[q_len]`` absolute key positions of the queries; default
            ``arange(k_len - q_len, k_len)``. A subset of positions (e.g. the answer tokens)
            scores only those queries against all keys.
        key_padding_mask: bool ``[batch, k_len]``, True for real tokens.
        return_output: also return the attention output (``[batch, n_heads, q_len, d_v]``; with
            the Triton backend a transposed view of a ``[batch, q_len, n_heads, d_v]`` buffer,
            the layout attention modules hand on).
        backend: ``"auto"`` (Triton for CUDA tensors when triton imports, else the torch
            reference), ``"triton"`` or ``"torch"``.

    Returns:
        `AttentionStats`; definitions, tie and fully-masked-row conventions in
        `kernels.reference`.
    """
    check_qk(q, k, v)
    if return_output and v is None:
        raise ValueError("return_output=True needs v")
    if not _use_triton(backend, q):
        return reference.attention_stats(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            sink_size=sink_size,
            recent_window=recent_window,
            spans=spans,
            q_positions=q_positions,
            key_padding_mask=key_padding_mask,
            return_output=return_output,
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the triton backend takes fp32/fp16/bf16 inputs, got {q.dtype}")
    a = check_args(
        q,
        k,
        scale=scale,
        q_positions=q_positions,
        key_padding_mask=key_padding_mask,
        spans=spans,
        sink_size=sink_size,
        recent_window=recent_window,
        materialize_positions=False,
    )
    if not a.scale > 0 or not math.isfinite(a.scale):
        raise ValueError(f"scale must be positive and finite, got {a.scale}")
    return _triton_stats(
        q,
        k,
        v,
        a,
        causal=causal,
        sink_size=sink_size,
        recent_window=recent_window,
        return_output=return_output,
    )
