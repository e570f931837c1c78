"""Received attention: the column sums of the softmax, per (batch, head, key).

``R_bhj = Σ_{i selected} P_ij`` (definition in `kernels.reference`). Each probability needs its
row's final log-sum-exp, so this is a second pass after `kernels.attention_stats`, which returns
``lse``.

Kernel layout
-------------
One program per (key block of ``BLOCK_N`` keys, batch × head) keeps its K tile in registers and
walks the query blocks: ``P = 2^{s2 - lse2}`` with ``s2, lse2`` in base-2 units. Each program owns
its output columns, so no atomics are needed; the column sums are accumulated elementwise in a
``[BLOCK_M, BLOCK_N]`` register tile and reduced across rows once at the end (a cross-warp
reduction per query block would cost more than the block's exponentials).

Rows that must not contribute (outside ``query_mask``, or fully masked with ``lse = -inf``) get
``lse2 = +inf`` as they are loaded, so their probabilities are exactly 0 without a per-score
mask; padding keys are zeroed at the store. A key block is seen only by the queries whose key
interval (causal mask, sliding window, chunk) reaches it: for sorted query positions (the default
ones included) those rows are contiguous, and the host finds them, together with the rows that
see the whole block and need no mask (`kernels.blocks.query_blocks`, cached for the default
positions); every other query block is skipped, so a sliding window costs O(L · W). Unsorted
positions mask every block. Softcapping and ALiBi turn the products into base-2 logits with the
same code as the stats kernel; learned sinks need nothing here, as they are already in ``lse``.
Everything else the host does is one allocation and the launch (no GPU sync unless
``q_positions`` arrive as a GPU tensor, whose range is checked there), since at a few
thousand tokens the whole pass takes a few hundred microseconds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import reference
from kernels.attention_stats import (
    _next_pow2,
    _use_triton,
    dot_precision,
    fast_tanh,
    triton_args,
)
from kernels.blocks import query_blocks
from kernels.reference import check_lse_and_query_mask, check_qk

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

__all__ = ["received_attention"]

_LOG2E = 1.4426950408889634


def block_sizes(d_head: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the received-attention kernel: the fastest
    of ``python -m kernels.bench --sweep 16384`` on an H100."""
    if not on_gpu:
        return 32, 32, 4, 1
    if d_head <= 64:
        return 64, 64, 4, 3
    return 64, 128, 4, 3


if triton is not None:
    from kernels.attention_stats import _load_rows, _row_range, _transform

    @triton.jit
    def _received_block(
        acc,
        Q_head,
        LSE_row,
        QMASK_row,
        QPOS,
        start_m,
        offs_m_base,
        offs_d,
        offs_n,
        kT,
        q_len,
        k_len,
        stride_qm,
        stride_qd,
        qk_scale,
        sm_scale,
        softcap,
        slope,
        window,
        chunk,
        chunk_off,
        d_head: tl.constexpr,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CHUNK: tl.constexpr,
        HAS_QMASK: tl.constexpr,
        DEFAULT_POS: tl.constexpr,
        TRANSFORM: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Add the probabilities of one query block to the [BLOCK_M, BLOCK_N] column tile."""
        offs_m = start_m + offs_m_base  # [BLOCK_M]
        q_ptrs = Q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        row_ok = offs_m < q_len
        if MASKED:
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < d_head), other=0.0)
            lse = tl.load(LSE_row + offs_m, mask=row_ok, other=-float("inf"))
        else:
            q = _load_rows(q_ptrs, offs_d, d_head)
            lse = tl.load(LSE_row + offs_m)
        # rows that must not contribute (fully masked: lse = -inf; unselected) get lse2 = +inf,
        # so their probabilities are exactly 0 without a per-score mask
        lse2 = tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)
        if HAS_QMASK:
            keep = tl.load(QMASK_row + offs_m, mask=row_ok, other=0)
            lse2 = tl.where(keep != 0, lse2, float("inf"))
        if MASKED or ALIBI:
            if DEFAULT_POS:
                qpos = offs_m + (k_len - q_len)
            else:
                qpos = tl.load(QPOS + offs_m, mask=row_ok, other=-1).to(tl.int32)
        else:
            qpos = offs_m  # unread
        s = tl.dot(q, kT, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        if TRANSFORM:  # base-2 logits, qk_scale = 1
            s = _transform(s, offs_n, qpos, sm_scale, softcap, slope, SOFTCAP, ALIBI, FAST_TANH)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            first, end = _row_range(qpos, k_len, window, chunk, chunk_off, CAUSAL, HAS_WINDOW,
                                    HAS_CHUNK)  # fmt: skip
            p = tl.where((offs_n[None, :] >= first[:, None]) & (offs_n[None, :] < end[:, None]),
                         p, 0.0)  # fmt: skip
        return acc + p

    @triton.jit
    def _received_fwd(
        Q,
        K,
        QPOS,
        LSE,
        QMASK,
        PAD,
        BOUNDS,
        CHUNK_OFF,
        SLOPES,
        OUT,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_qmask_b,
        stride_pad_b,
        stride_bounds_b,
        n_heads,
        group,
        q_len,
        k_len,
        window,
        chunk,
        qk_scale,
        sm_scale,
        softcap,
        d_head: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CHUNK: tl.constexpr,
        HAS_QMASK: tl.constexpr,
        HAS_PAD: tl.constexpr,
        DEFAULT_POS: tl.constexpr,
        TRANSFORM: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        kv_h = h // group  # GQA: the HF repeat_kv rule

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        offs_m_base = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < k_len
        K_head = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
        k_ptrs = K_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_d[None, :] < d_head), other=0.0)
        kT = tl.trans(k)  # [BLOCK_D, BLOCK_N]
        Q_head = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        LSE_row = LSE + pid_bh.to(tl.int64) * q_len
        QMASK_row = QMASK + b.to(tl.int64) * stride_qmask_b
        chunk_off = 0
        if HAS_CHUNK and HAS_PAD:  # chunks start at the row's first real token
            chunk_off = tl.load(CHUNK_OFF + b).to(tl.int32)
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + h).to(tl.float32)

        # Query rows (kernels.blocks): masked [lo, un_lo), unmasked [un_lo, un_hi), masked
        # [un_hi, hi); the other rows see no key of this block.
        bounds = BOUNDS + b.to(tl.int64) * stride_bounds_b + pid_n * 4
        lo = tl.load(bounds)
        un_lo = tl.load(bounds + 1)
        un_hi = tl.load(bounds + 2)
        hi = tl.load(bounds + 3)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start_m in range(lo, un_lo, BLOCK_M):
            acc = _received_block(
                acc, Q_head, LSE_row, QMASK_row, QPOS, start_m, offs_m_base, offs_d, offs_n, kT,
                q_len, k_len, stride_qm, stride_qd, qk_scale, sm_scale, softcap, slope, window,
                chunk, chunk_off, d_head, True, CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_QMASK,
                DEFAULT_POS, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, DOT_PREC,
            )  # fmt: skip
        for start_m in range(un_lo, un_hi, BLOCK_M):
            acc = _received_block(
                acc, Q_head, LSE_row, QMASK_row, QPOS, start_m, offs_m_base, offs_d, offs_n, kT,
                q_len, k_len, stride_qm, stride_qd, qk_scale, sm_scale, softcap, slope, window,
                chunk, chunk_off, d_head, False, CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_QMASK,
                DEFAULT_POS, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, DOT_PREC,
            )  # fmt: skip
        for start_m in range(un_hi, hi, BLOCK_M):
            acc = _received_block(
                acc, Q_head, LSE_row, QMASK_row, QPOS, start_m, offs_m_base, offs_d, offs_n, kT,
                q_len, k_len, stride_qm, stride_qd, qk_scale, sm_scale, softcap, slope, window,
                chunk, chunk_off, d_head, True, CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_QMASK,
                DEFAULT_POS, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, DOT_PREC,
            )  # fmt: skip
        out = tl.sum(acc, axis=0)  # [BLOCK_N]
        if HAS_PAD:  # padding keys receive 0
            real = tl.load(PAD + b.to(tl.int64) * stride_pad_b + offs_n, mask=col_ok, other=0)
            out = tl.where(real != 0, out, 0.0)
        tl.store(OUT + pid_bh.to(tl.int64) * k_len + offs_n, out, mask=col_ok)


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
    backend: str = "auto",
) -> Tensor:
    """Attention received by every key: ``Σ_i P_ij`` over the selected queries.

    Args:
        q, k: as for `kernels.attention_stats` (GQA allowed).
        lse: ``[batch, n_heads, q_len]`` log-sum-exp of each query row, as returned by
            `kernels.attention_stats` with the same q, k and masking arguments.
        causal, scale, q_positions, key_padding_mask, window, chunk, softcap, alibi_slopes: as
            for `kernels.attention_stats`.
        sinks: as for `kernels.attention_stats`, so that one set of keyword arguments serves
            both calls; only checked here, as ``lse`` already holds the learned sinks.
        query_mask: bool ``[batch, q_len]`` selecting the queries that contribute; None = all.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (as for `kernels.attention_stats`).

    Returns:
        ``[batch, n_heads, k_len]`` fp32 column sums; 0 at padding keys.
    """
    check_qk(q, k)
    batch, n_heads, q_len, _ = q.shape
    check_lse_and_query_mask(lse, query_mask, batch, n_heads, q_len)
    variant = dict(window=window, chunk=chunk, softcap=softcap, sinks=sinks,
                   alibi_slopes=alibi_slopes)  # fmt: skip
    if not _use_triton(backend, q):
        return reference.received_attention(
            q, k, lse, causal=causal, scale=scale, q_positions=q_positions,
            key_padding_mask=key_padding_mask, query_mask=query_mask, **variant,
        )  # fmt: skip
    a = triton_args(
        q, k, scale=scale, q_positions=q_positions, key_padding_mask=key_padding_mask, **variant
    )
    return _triton_received(q, k, lse, a, causal=causal, query_mask=query_mask)


def _triton_received(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    a: reference._Args,
    *,
    causal: bool,
    query_mask: Tensor | None,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Launch the kernel on validated arguments; ``config`` overrides `block_sizes`.

    One allocation and one launch for the default query positions (their row bounds are
    cached): the natural-log ``lse``, the query mask and the padding mask are read by the kernel
    as they are.
    """
    batch, n_heads, q_len, d_head = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    if q_len == 0 or k_len == 0:
        return torch.zeros(batch, n_heads, k_len, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, n_heads, k_len, dtype=torch.float32, device=q.device)
    lse = lse.to(device=q.device, dtype=torch.float32).contiguous()  # no-op for stats' lse
    qmask = None
    if query_mask is not None:
        qmask = query_mask.to(q.device)
        qmask = (qmask if qmask.stride(1) == 1 else qmask.contiguous()).view(torch.int8)
    pad = a.key_padding_mask
    if pad is not None:
        pad = (pad if pad.stride(1) == 1 else pad.contiguous()).view(torch.int8)
    block_m, block_n, warps, stages = config or block_sizes(d_head, q.is_cuda)
    bounds = query_blocks(
        a.q_positions, a.sorted_positions, q_len, k_len, causal=causal, window=a.window,
        chunk=a.chunk, chunk_start=a.chunk_start, block_m=block_m, block_n=block_n,
        device=q.device,
    )  # fmt: skip
    transform = a.softcap is not None or a.alibi_slopes is not None
    grid = (triton.cdiv(k_len, block_n), batch * n_heads)
    _received_fwd[grid](
        q, k, out if a.q_positions is None else a.q_positions, lse,
        out if qmask is None else qmask, out if pad is None else pad, bounds,
        out if a.chunk_start is None else a.chunk_start,
        out if a.alibi_slopes is None else a.alibi_slopes, out,
        *q.stride(), *k.stride(),
        0 if qmask is None else qmask.stride(0), 0 if pad is None else pad.stride(0),
        bounds.stride(0) if bounds.shape[0] > 1 else 0,
        n_heads, n_heads // n_kv, q_len, k_len, a.window or 1, a.chunk or 1,
        1.0 if transform else a.scale * _LOG2E, a.scale, a.softcap or 1.0,
        d_head=d_head, CAUSAL=causal, HAS_WINDOW=a.window is not None,
        HAS_CHUNK=a.chunk is not None, HAS_QMASK=qmask is not None, HAS_PAD=pad is not None,
        DEFAULT_POS=a.q_positions is None, TRANSFORM=transform, SOFTCAP=a.softcap is not None,
        ALIBI=a.alibi_slopes is not None, DOT_PREC=dot_precision(q.dtype),
        FAST_TANH=fast_tanh(q.dtype, q.is_cuda), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=_next_pow2(d_head),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
