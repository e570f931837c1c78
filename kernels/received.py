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
``lse2 = +inf`` on the host, so their probabilities are exactly 0 without a per-row mask. Padding
keys are zeroed after the kernel. Under a causal mask, a key block is seen only by queries at or
after its first key: for sorted ``q_positions`` the host finds, per key block, the first query
block that sees it and the first one that sees all of it without masking.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels import reference
from kernels.attention_stats import _next_pow2, _use_triton, dot_precision
from kernels.reference import check_args, check_lse_and_query_mask, check_qk

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
    from kernels.attention_stats import _load_rows

    @triton.jit
    def _received_block(
        acc,
        Q_head,
        LSE_row,
        QPOS,
        start_m,
        offs_m_base,
        offs_d,
        offs_n,
        kT,
        q_len,
        stride_qm,
        stride_qd,
        qk_scale,
        d_head: tl.constexpr,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Add the probabilities of one query block to the [BLOCK_M, BLOCK_N] column tile."""
        offs_m = start_m + offs_m_base  # [BLOCK_M]
        q_ptrs = Q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        if MASKED:
            row_ok = offs_m < q_len
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < d_head), other=0.0)
            lse2 = tl.load(LSE_row + offs_m, mask=row_ok, other=float("inf"))
        else:
            q = _load_rows(q_ptrs, offs_d, d_head)
            lse2 = tl.load(LSE_row + offs_m)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED and CAUSAL:
            qpos = tl.load(QPOS + offs_m, mask=row_ok, other=-1)
            p = tl.where(offs_n[None, :] <= qpos[:, None], p, 0.0)
        return acc + p

    @triton.jit
    def _received_fwd(
        Q,
        K,
        QPOS,
        LSE2,
        Q_LO,
        Q_UN,
        OUT,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        n_heads,
        group,
        q_len,
        k_len,
        qk_scale,
        d_head: tl.constexpr,
        CAUSAL: tl.constexpr,
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
        LSE_row = LSE2 + pid_bh.to(tl.int64) * q_len

        # Query blocks: [lo, un) need the causal mask, [un, n_full) none, the tail needs bounds.
        n_full = q_len // BLOCK_M
        lo = tl.load(Q_LO + pid_n)
        lo_c = tl.minimum(lo, n_full)
        un = tl.minimum(tl.maximum(tl.load(Q_UN + pid_n), lo_c), n_full)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for mb in range(lo_c, un):
            acc = _received_block(
                acc, Q_head, LSE_row, QPOS, mb * BLOCK_M, offs_m_base, offs_d, offs_n, kT,
                q_len, stride_qm, stride_qd, qk_scale, d_head, True, CAUSAL, DOT_PREC,
            )  # fmt: skip
        for mb in range(un, n_full):
            acc = _received_block(
                acc, Q_head, LSE_row, QPOS, mb * BLOCK_M, offs_m_base, offs_d, offs_n, kT,
                q_len, stride_qm, stride_qd, qk_scale, d_head, False, CAUSAL, DOT_PREC,
            )  # fmt: skip
        for mb in range(tl.maximum(n_full, lo), tl.cdiv(q_len, BLOCK_M)):
            acc = _received_block(
                acc, Q_head, LSE_row, QPOS, mb * BLOCK_M, offs_m_base, offs_d, offs_n, kT,
                q_len, stride_qm, stride_qd, qk_scale, d_head, True, CAUSAL, DOT_PREC,
            )  # fmt: skip
        out = tl.sum(acc, axis=0)  # [BLOCK_N]
        tl.store(OUT + pid_bh.to(tl.int64) * k_len + offs_n, out, mask=col_ok)


def _query_block_ranges(
    q_positions: Tensor, k_len: int, block_m: int, block_n: int, causal: bool, is_sorted: bool
) -> tuple[Tensor, Tensor]:
    """Per key block: the first query block that sees any of it and the first from which every
    query sees all of it (int32 [n_key_blocks] each)."""
    dev = q_positions.device
    n_kb = triton.cdiv(k_len, block_n)
    n_qb = triton.cdiv(q_positions.shape[0], block_m)
    if not causal:
        zero = torch.zeros(n_kb, dtype=torch.int32, device=dev)
        return zero, zero
    if not is_sorted:
        return (
            torch.zeros(n_kb, dtype=torch.int32, device=dev),
            torch.full((n_kb,), n_qb, dtype=torch.int32, device=dev),
        )
    first = torch.arange(n_kb, device=dev) * block_n  # [n_kb] first key of each block
    last = torch.clamp(first + block_n, max=k_len) - 1
    lo = torch.searchsorted(q_positions, first) // block_m
    un = (torch.searchsorted(q_positions, last) + block_m - 1) // block_m
    return lo.to(torch.int32), un.to(torch.int32)


def received_attention(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_positions: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention received by every key: ``Σ_i P_ij`` over the selected queries.

    Args:
        q, k: as for `kernels.attention_stats` (GQA allowed).
        lse: ``[batch, n_heads, q_len]`` log-sum-exp of each query row, as returned by
            `kernels.attention_stats` with the same q, k and masking arguments.
        causal, scale, q_positions, key_padding_mask: as for `kernels.attention_stats`.
        query_mask: bool ``[batch, q_len]`` selecting the queries that contribute; None = all.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (as for `kernels.attention_stats`).

    Returns:
        ``[batch, n_heads, k_len]`` fp32 column sums; 0 at padding keys.
    """
    check_qk(q, k)
    batch, n_heads, q_len, _ = q.shape
    check_lse_and_query_mask(lse, query_mask, batch, n_heads, q_len)
    if not _use_triton(backend, q):
        return reference.received_attention(
            q, k, lse, causal=causal, scale=scale, q_positions=q_positions,
            key_padding_mask=key_padding_mask, query_mask=query_mask,
        )  # fmt: skip
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the triton backend takes fp32/fp16/bf16 inputs, got {q.dtype}")
    a = check_args(q, k, scale=scale, q_positions=q_positions, key_padding_mask=key_padding_mask)
    if not a.scale > 0 or not math.isfinite(a.scale):
        raise ValueError(f"scale must be positive and finite, got {a.scale}")
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
    """Launch the kernel on validated arguments; ``config`` overrides `block_sizes`."""
    batch, n_heads, q_len, d_head = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    out = torch.zeros(batch, n_heads, k_len, dtype=torch.float32, device=q.device)
    if q_len == 0 or k_len == 0:
        return out
    keep = torch.isfinite(lse)  # [batch, n_heads, q_len]
    if query_mask is not None:
        keep = keep & query_mask.to(q.device)[:, None, :]
    lse2 = torch.where(keep, lse.float() * _LOG2E, math.inf).contiguous()
    is_sorted = a.default_positions or bool((a.q_positions[1:] >= a.q_positions[:-1]).all())
    block_m, block_n, warps, stages = config or block_sizes(d_head, q.is_cuda)
    q_lo, q_un = _query_block_ranges(a.q_positions, k_len, block_m, block_n, causal, is_sorted)
    grid = (triton.cdiv(k_len, block_n), batch * n_heads)
    _received_fwd[grid](
        q, k, a.q_positions.to(torch.int32), lse2, q_lo, q_un, out,
        *q.stride(), *k.stride(),
        n_heads, n_heads // n_kv, q_len, k_len, a.scale * _LOG2E,
        d_head=d_head, CAUSAL=causal, DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_next_pow2(d_head),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if a.key_padding_mask is not None:
        out.masked_fill_(~a.key_padding_mask[:, None, :], 0.0)
    return out
