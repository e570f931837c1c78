"""The keys each query attends to most: the top ``k_top`` keys per (batch, head, query).

`top_keys` returns, for every query, the ``k_top`` visible keys with the largest logits, largest
first, with their probabilities ``exp(s_ij - lse_i)`` (definition, tie rule and padding in
`kernels.reference`). It is what a long prompt's view draws per query instead of an L×L
pattern: where the weight goes, not only its largest share (``argmax``).

Kernel layout
-------------
One program per (query block of ``BLOCK_M`` rows, batch × head), walking its key blocks with the
same loop bounds as `kernels.attention_stats` (`kernels.blocks.key_blocks`: masked, unmasked,
masked; blocks no row sees are never loaded). Each row keeps a running top-k of *packed keys*:
one int64 per candidate whose order is the order the definition asks for,

    packed = (ordered(s2) << 32) | (2^31 - 1 - j)

with ``s2`` the base-2 logit (fp32) and ``ordered`` the order-preserving map of its bits to an
int32 (negative floats have their magnitude bits flipped). A larger logit gives a larger key,
and between equal logits the smaller index does, so one integer comparison decides both, and
every key is distinct. A key block is merged by ``k_top`` rounds of "take the largest of the
running keys and the block's, remove it" (an exact selection; `tl.sort` would sort all
``BLOCK_N + k_top`` candidates to keep ``k_top``). A block in which no row has a candidate above
its current ``k_top``-th key is not merged at all, which is most blocks of a long prompt once
each row has found where it attends.

After the walk the packed keys are unpacked into the logit and the index; the probability
is ``2^{s2 - lse2}`` with the row's ``lse`` from `kernels.attention_stats` (which callers have
already; it includes a learned sink), so this is a second pass like `kernels.received`. Slots
still holding a masked key (``-inf``) or nothing are padding: probability 0, index -1.

``k_top`` is a power of two up to 16 (the width of the running tile must be one); the torch
reference takes any ``k_top`` but this function refuses the others on every backend, so that
code written on a CPU runs on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import reference
from kernels.attention_stats import (
    _next_pow2,
    _use_triton,
    attention_stats,
    dot_precision,
    fast_tanh,
    triton_args,
)
from kernels.blocks import key_blocks
from kernels.reference import check_lse_and_query_mask, check_qk

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

__all__ = ["K_TOP_CHOICES", "top_keys"]

K_TOP_CHOICES = (1, 2, 4, 8, 16)
_LOG2E = 1.4426950408889634


def block_sizes(on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the top-keys kernel. On a GPU the stats
    kernel's shape for d <= 64, not tuned for this kernel; the interpreter gets small blocks
    so that tests at a few hundred tokens cross several blocks."""
    if not on_gpu:
        return 32, 32, 4, 1
    return 64, 64, 4, 2


if triton is not None:
    from kernels.attention_stats import _query_block, _scores

    # below every packed key: an empty slot of the running top-k
    _EMPTY = tl.constexpr(-(2**63))

    @triton.jit
    def _pack(s2, offs_n):
        """Base-2 logits [BLOCK_M, BLOCK_N] (-inf where not visible) and their key indices
        [BLOCK_N] -> int64 keys ordered by logit, then by smaller index."""
        s2 = tl.where(s2 == 0.0, 0.0, s2)  # -0.0 and +0.0 are one logit
        bits = s2.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: magnitude bits flipped
        low = (0x7FFFFFFF - offs_n).to(tl.int64)  # [BLOCK_N], in [0, 2^31)
        return (ordered.to(tl.int64) << 32) | low[None, :]

    @triton.jit
    def _unpack(packed):
        """Packed keys -> (base-2 logits fp32, key indices int32): `_pack` backwards."""
        ordered = (packed >> 32).to(tl.int32)
        bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
        low = packed - ((packed >> 32) << 32)
        return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - low.to(tl.int32)

    @triton.jit
    def _merge(best, packed, K_TOP: tl.constexpr):
        """The K_TOP largest of ``best`` [BLOCK_M, K_TOP] (largest first) and ``packed``
        [BLOCK_M, BLOCK_N], largest first. All keys are distinct, so each round removes one."""
        cols = tl.arange(0, K_TOP)[None, :]
        merged = tl.full(best.shape, _EMPTY, tl.int64)
        for r in tl.static_range(K_TOP):
            top = tl.maximum(tl.max(best, axis=1), tl.max(packed, axis=1))[:, None]
            merged = tl.where(cols == r, top, merged)
            best = tl.where(best == top, _EMPTY, best)
            packed = tl.where(packed == top, _EMPTY, packed)
        return merged

    @triton.jit
    def _top_block(
        best,
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
        first,
        end,
        pad_row,
        qk_scale,
        sm_scale,
        softcap,
        slope,
        MASKED: tl.constexpr,
        HAS_PAD: tl.constexpr,
        TRANSFORM: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
        DOT_PREC: tl.constexpr,
        K_TOP: tl.constexpr,
    ):
        """Fold one key block into the running top-k ``best`` of the query block."""
        # the stats kernel's scores (`reference._logits`), -inf where not visible, in base 2
        s2 = _scores(
            q, K_head, start_n, offs_n_base, offs_d, k_len, stride_kn, stride_kd, d_head, qpos,
            first, end, pad_row, sm_scale, softcap, slope, MASKED, HAS_PAD, TRANSFORM, SOFTCAP,
            ALIBI, FAST_TANH, DOT_PREC,
        )  # fmt: skip
        if not TRANSFORM:
            s2 = s2 * qk_scale  # qk_scale = scale · log2 e
        packed = _pack(s2, start_n + offs_n_base)  # [BLOCK_M, BLOCK_N]
        # the running k-th key of each row (the smallest of its top-k): merge only if beaten
        beaten = tl.max(packed, axis=1) > tl.min(best, axis=1)  # [BLOCK_M]
        if tl.max(beaten.to(tl.int32), axis=0) > 0:
            best = _merge(best, packed, K_TOP)
        return best

    @triton.jit
    def _top_keys_fwd(
        Q,
        K,
        QPOS,
        LSE,
        PAD,
        BOUNDS,
        CHUNK_OFF,
        SLOPES,
        PROBS,
        INDEX,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
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
        K_TOP: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CHUNK: tl.constexpr,
        TRANSFORM: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
        DEFAULT_POS: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        (b, h, _kv_h, offs_m, row_ok, qpos, first, end, slope, q, K_head, pad_row, lo, un_lo, un_hi,
         hi) = _query_block(
            Q, K, QPOS, PAD, BOUNDS, CHUNK_OFF, SLOPES, stride_qb, stride_qh, stride_qm, stride_qd,
            stride_kb, stride_kh, stride_pad_b, stride_bounds_b, n_heads, group, q_len, k_len,
            window, chunk, d_head, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_CHUNK, ALIBI, DEFAULT_POS,
            BLOCK_M, BLOCK_D,
        )  # fmt: skip
        offs_n_base = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        best = tl.full([BLOCK_M, K_TOP], _EMPTY, tl.int64)
        for start_n in range(lo, un_lo, BLOCK_N):
            best = _top_block(
                best, q, K_head, start_n, offs_n_base, offs_d, k_len, stride_kn, stride_kd,
                d_head, qpos, first, end, pad_row, qk_scale, sm_scale, softcap, slope, True,
                HAS_PAD, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, DOT_PREC, K_TOP,
            )  # fmt: skip
        for start_n in range(un_lo, un_hi, BLOCK_N):
            best = _top_block(
                best, q, K_head, start_n, offs_n_base, offs_d, k_len, stride_kn, stride_kd,
                d_head, qpos, first, end, pad_row, qk_scale, sm_scale, softcap, slope, False,
                HAS_PAD, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, DOT_PREC, K_TOP,
            )  # fmt: skip
        for start_n in range(un_hi, hi, BLOCK_N):
            best = _top_block(
                best, q, K_head, start_n, offs_n_base, offs_d, k_len, stride_kn, stride_kd,
                d_head, qpos, first, end, pad_row, qk_scale, sm_scale, softcap, slope, True,
                HAS_PAD, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, DOT_PREC, K_TOP,
            )  # fmt: skip

        s2, index = _unpack(best)  # [BLOCK_M, K_TOP]
        live = (best != _EMPTY) & (s2 > -float("inf"))  # a visible key, not padding
        row = (b * n_heads + h).to(tl.int64) * q_len + offs_m  # [BLOCK_M] into [B, H, q_len]
        lse2 = tl.load(LSE + row, mask=row_ok, other=0.0) * 1.4426950408889634
        # a live slot's row has a finite lse; the others read 0 - 0 instead of -inf - (-inf)
        s_live = tl.where(live, s2, 0.0)
        lse_live = tl.where(lse2 > -float("inf"), lse2, 0.0)
        probs = tl.where(live, tl.math.exp2(s_live - lse_live[:, None]), 0.0)
        out = row[:, None] * K_TOP + tl.arange(0, K_TOP)[None, :]
        tl.store(PROBS + out, probs, mask=row_ok[:, None])
        tl.store(INDEX + out, tl.where(live, index, -1).to(tl.int64), mask=row_ok[:, None])


def check_k_top(k_top: int) -> int:
    """``k_top`` as an int; ValueError unless it is one of :data:`K_TOP_CHOICES`."""
    if isinstance(k_top, bool) or not isinstance(k_top, int) or k_top not in K_TOP_CHOICES:
        raise ValueError(
            f"k_top must be a power of two up to 16 ({', '.join(map(str, K_TOP_CHOICES))}), "
            f"got {k_top!r}"
        )
    return k_top


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
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The ``k_top`` keys each query attends to most, with their probabilities.

    Args:
        q, k: as for `kernels.attention_stats` (GQA allowed).
        lse: ``[batch, n_heads, q_len]`` log-sum-exp of each query row, as returned by
            `kernels.attention_stats` with the same q, k and masking arguments; None computes it
            with `kernels.attention_stats` first (one more pass).
        k_top: keys per query: 1, 2, 4, 8 or 16.
        causal, scale, q_positions, key_padding_mask, window, chunk, softcap, alibi_slopes: as
            for `kernels.attention_stats`.
        sinks: as for `kernels.attention_stats`; enters through ``lse`` (the probabilities are
            the softmax's own, with the learned sink's share in the denominator).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (as for `kernels.attention_stats`).

    Returns:
        ``(probabilities, indices)``, each ``[batch, n_heads, q_len, k_top]``, fp32 and int64,
        the largest probability first; ties go to the smaller key index; a row with fewer
        visible keys than ``k_top`` is padded with probability 0 and index -1.
    """
    check_qk(q, k)
    k_top = check_k_top(k_top)
    variant = dict(window=window, chunk=chunk, softcap=softcap, sinks=sinks,
                   alibi_slopes=alibi_slopes)  # fmt: skip
    masks = dict(causal=causal, scale=scale, q_positions=q_positions,
                 key_padding_mask=key_padding_mask, **variant)  # fmt: skip
    if lse is None:
        lse = attention_stats(q, k, backend=backend, **masks).lse
    batch, n_heads, q_len, _ = q.shape
    check_lse_and_query_mask(lse, None, batch, n_heads, q_len)
    if not _use_triton(backend, q):
        probs, index = reference.top_keys(q, k, lse, k_top=k_top, **masks)
        return probs.float(), index
    a = triton_args(
        q, k, scale=scale, q_positions=q_positions, key_padding_mask=key_padding_mask, **variant
    )
    return _triton_top_keys(q, k, lse, a, causal=causal, k_top=k_top)


def _triton_top_keys(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    a: reference._Args,
    *,
    causal: bool,
    k_top: int,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the kernel on validated arguments; ``config`` overrides `block_sizes`."""
    batch, n_heads, q_len, d_head = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    dev = q.device
    probs = torch.zeros(batch, n_heads, q_len, k_top, dtype=torch.float32, device=dev)
    index = torch.full((batch, n_heads, q_len, k_top), -1, dtype=torch.int64, device=dev)
    if q_len == 0 or k_len == 0:
        return probs, index
    lse = lse.to(device=dev, dtype=torch.float32).contiguous()  # no-op for stats' lse
    pad = a.key_padding_mask
    if pad is not None:
        pad = (pad if pad.stride(1) == 1 else pad.contiguous()).view(torch.int8)
    block_m, block_n, warps, stages = config or block_sizes(q.is_cuda)
    bounds = key_blocks(
        a.q_positions, q_len, k_len, causal=causal, window=a.window, chunk=a.chunk,
        chunk_start=a.chunk_start, full_blocks=pad is None, block_m=block_m, block_n=block_n,
        device=dev,
    )  # fmt: skip
    transform = a.softcap is not None or a.alibi_slopes is not None
    grid = (triton.cdiv(q_len, block_m), batch * n_heads)
    _top_keys_fwd[grid](
        q, k,
        lse if a.q_positions is None else a.q_positions,  # unread with default positions
        lse,
        pad if pad is not None else lse,  # unread dummies from here
        bounds,
        a.chunk_start if a.chunk_start is not None else lse,
        a.alibi_slopes if a.alibi_slopes is not None else lse,
        probs, index,
        *q.stride(), *k.stride(),
        pad.stride(0) if pad is not None else 0,
        bounds.stride(0) if bounds.shape[0] > 1 else 0,
        n_heads, n_heads // n_kv, q_len, k_len, a.window or 1, a.chunk or 1,
        a.scale * _LOG2E, a.scale, a.softcap or 1.0,
        d_head=d_head, K_TOP=k_top, CAUSAL=causal, HAS_PAD=pad is not None,
        HAS_WINDOW=a.window is not None, HAS_CHUNK=a.chunk is not None, TRANSFORM=transform,
        SOFTCAP=a.softcap is not None, ALIBI=a.alibi_slopes is not None,
        FAST_TANH=fast_tanh(q.dtype, q.is_cuda), DEFAULT_POS=a.q_positions is None,
        DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_next_pow2(d_head),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return probs, index
