"""Per-query attention statistics in one streamed pass (FlashAttention-style forward).

`attention_stats` computes, for every (batch, head, query), the log-sum-exp, the entropy, the
maximum probability and its key index, the mass on the first ``sink_size`` keys, the mass on
given key spans and the mass outside sinks + a recent window -- and, on request, the attention
output itself -- without forming the L×L pattern. It covers the attention variants of current
models: sliding windows, chunks, logit softcapping, learned sink logits, ALiBi and a value
width of its own. The definitions live in `kernels.reference`.

Kernel layout
-------------
One program per (query block of ``BLOCK_M`` rows, batch × head). It walks its key blocks once,
keeping per row, in base-2 units (``s2 = s · log2 e``):

- ``m``: running max of ``s2``; ``l = Σ 2^{s2 - m}``; ``u = Σ 2^{s2 - m} (s2 - m)``, rescaled by
  ``α = 2^{m - m'}`` as ``u ← α (u + (m - m') l)`` when the max grows. Then ``lse = ln2 (m +
  log2 l)``, ``H = ln l - ln2 · u / l`` and ``max_prob = 1 / l``.
- ``arg``: the key index of the running max (a block only replaces it on a strictly larger max,
  so ties keep the smallest index).
- ``acc``: ``Σ 2^{s2 - m} v`` when the output is requested (rescaled by ``α`` like FlashAttention).

Which key blocks: each row sees one interval of keys (causal mask, sliding window, chunk), so a
query block's keys come in three runs (`kernels.blocks`, computed on the host): blocks only some
rows see (masked loop), blocks every row sees in full (a loop without masks), masked again.
Blocks outside are never loaded, so a sliding window of W keys costs O(L · W), not O(L²).

Logits: without a score transform the products ``q·k`` are scaled by ``qk_scale = scale · log2
e`` fused with the max subtraction (one FMA per score, as in the Triton fused-attention tutorial).
With softcapping (``c · tanh(s / c)``) or ALiBi (``+ m_h (j - p)``, from key and query indices,
no L×L bias tensor) the scores are first turned into base-2 logits and the fused scale is 1.

Learned sinks (gpt-oss): after the main loop, the sink logit ``z2`` of the head is folded into
``(m, l, u)`` like one more key without a value; ``max_prob`` stays the largest key probability,
``2^{m_keys - m} / l``, and ``learned_sink_mass = 2^{z2 - m} / l``.

The sink, span and recent-window masses touch few keys, so they are not accumulated in the main
loop: after it, the final ``m`` and ``l`` are known and a short second walk over just those key
blocks (inside the program's key range) sums ``2^{s2 - m}`` over each set. Outside mass is
``Σ_keys - sink - recent`` for causal attention (the recent window is the short range), and
summed directly for bidirectional attention.

Grouped-query attention reads kv head ``h // group`` with plain pointer offsets (no repeated K).
Query blocks are launched heaviest first, which shortens the tail of causal grids.

Split keys (decoding): one query per head is a grid of B·H programs, each walking the whole
cache on one multiprocessor. When the grid is small (`key_splits`), a third grid axis gives each
program one share of the keys; it writes its partial ``(m, l, u, arg)``, unnormalised masses and
output to [n_splits, ...] buffers, and `_combine_splits` merges them with the weights
``2^{m_s - m}`` (FlashDecoding's scheme), then adds the learned sink and normalises.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from kernels import reference
from kernels.blocks import key_blocks
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


def block_sizes(
    d_head: int, on_gpu: bool, with_output: bool = False, q_len: int | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the stats kernel.

    The fastest of ``python -m kernels.bench --sweep 16384`` on an H200 (bf16, 32 query / 8 KV
    heads; benchmarks/results/nvidia-h200-sweep-16384.json). Statistics: 128×64 tiles on 4 warps
    at d=128, 64×64 at d=64. With the output: 128×64 on 8 warps at d=128 (the 4-warp
    configuration spills its [BLOCK_M, d] accumulator: 1.8x slower), 64×64 on 4 warps at d=64
    (10% faster than 128×128 on 8). Heads wider than 128 (MLA's 192) get 64-row blocks so that
    the q tile and accumulator fit; not tuned. The interpreter gets small blocks so that tests at
    a few hundred tokens still cross several blocks.

    Decoding (``q_len`` of at most 16 on a GPU): 16-row blocks, so that a step is not 128 rows of
    which one is real (its keys are split across programs instead, `key_splits`).
    """
    if not on_gpu:
        return 32, 32, 4, 1
    if q_len is not None and q_len <= 16:
        return 16, 64, 4, 3
    if d_head > 128:
        return (64, 64, 8, 2) if with_output else (64, 64, 4, 2)
    if d_head <= 64:
        return 64, 64, 4, 3
    return (128, 64, 8, 3) if with_output else (128, 64, 4, 3)


def fast_tanh(dtype: torch.dtype, on_gpu: bool) -> bool:
    """Whether softcapped logits use the hardware tanh (`_tanh`): 16-bit inputs on a GPU, where
    its 2^-11 relative error is below the rounding of the scores themselves."""
    return on_gpu and dtype in (torch.float16, torch.bfloat16)


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
    def _tanh(x, FAST_TANH: tl.constexpr):
        """tanh for logit softcapping.

        FAST_TANH (`fast_tanh`): PTX ``tanh.approx.f32``, one special-function op per score
        (relative error 2^-11, as in FlashAttention's softcap); on the H200 it made the softcapped
        statistics pass 1.4x faster than the form below, 1.5e-5 from the fp32 reference in bf16
        (benchmarks/results/nvidia-h200-sweep-16384.json). Otherwise tanh from exp2 and a fast
        division, ~1e-7 absolute error: for fp32 inputs, and for the interpreter, which runs no
        inline PTX.
        """
        if FAST_TANH:
            y = tl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            t = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # e^{-2|x|}
            y = tl.fdiv(1.0 - t, 1.0 + t, ieee_rounding=False)
            y = tl.where(x < 0, -y, y)
        return y

    @triton.jit
    def _row_range(
        qpos,
        k_len,
        window,
        chunk,
        chunk_off,
        CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CHUNK: tl.constexpr,
    ):
        """[first, end) of the keys each row may see before padding (`reference.key_range`)."""
        first = tl.zeros_like(qpos)
        end = tl.zeros_like(qpos) + k_len
        if CAUSAL:
            end = tl.minimum(end, qpos + 1)
        if HAS_WINDOW:
            first = tl.maximum(first, qpos - window + 1)
            if not CAUSAL:
                end = tl.minimum(end, qpos + window)
        if HAS_CHUNK:
            t = qpos - chunk_off
            c = t // chunk
            c = tl.where(c * chunk > t, c - 1, c)  # floor, however // rounds negatives
            start = chunk_off + c * chunk
            first = tl.maximum(first, start)
            end = tl.minimum(end, start + chunk)
        return first, end

    @triton.jit
    def _transform(
        s,
        offs_n,
        qpos,
        sm_scale,
        softcap,
        slope,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
    ):
        """Raw products q·k [BLOCK_M, BLOCK_N] -> base-2 logits (`reference._logits` · log2 e)."""
        x = s * sm_scale
        if SOFTCAP:
            x = softcap * _tanh(x * (1.0 / softcap), FAST_TANH)
        if ALIBI:
            x += slope * (offs_n[None, :] - qpos[:, None]).to(tl.float32)
        return x * 1.4426950408889634

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
        first,
        end,
        pad_row,
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
    ):
        """Scores of one key block, -inf where not visible: [BLOCK_M, BLOCK_N].

        Without a TRANSFORM the raw products q·k: callers scale them by ``qk_scale > 0`` (base-2
        units) fused with the max subtraction. With one, base-2 logits, and ``qk_scale = 1``."""
        offs_n = start_n + offs_n_base  # [BLOCK_N]
        k_ptrs = K_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        if MASKED:
            k = tl.load(
                k_ptrs, mask=(offs_n[:, None] < k_len) & (offs_d[None, :] < d_head), other=0.0
            )
        else:
            k = _load_rows(k_ptrs, offs_d, d_head)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
        if TRANSFORM:
            s = _transform(s, offs_n, qpos, sm_scale, softcap, slope, SOFTCAP, ALIBI, FAST_TANH)
        if MASKED:  # end <= k_len, so this also masks keys past the end
            vis = (offs_n[None, :] >= first[:, None]) & (offs_n[None, :] < end[:, None])
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
        first,
        end,
        pad_row,
        qk_scale,
        sm_scale,
        softcap,
        slope,
        m_i,
        l_i,
        u_i,
        arg_i,
        acc,
        MASKED: tl.constexpr,
        HAS_PAD: tl.constexpr,
        TRANSFORM: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
        RETURN_OUTPUT: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Fold one key block into the running (m, l, u, arg, acc) of the query block."""
        s = _scores(
            q, K_head, start_n, offs_n_base, offs_d, k_len, stride_kn, stride_kd, d_head, qpos,
            first, end, pad_row, sm_scale, softcap, slope, MASKED, HAS_PAD, TRANSFORM, SOFTCAP,
            ALIBI, FAST_TANH, DOT_PREC,
        )  # fmt: skip
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
        first,
        end,
        pad_row,
        qk_scale,
        sm_scale,
        softcap,
        slope,
        m_safe,
        row_lo,
        row_hi,
        HAS_PAD: tl.constexpr,
        TRANSFORM: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Σ 2^{s2 - m} over visible keys j with row_lo <= j < row_hi ([BLOCK_M] bounds), walking
        the key blocks that cover [lo, hi)."""
        c = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            s = _scores(
                q, K_head, start_n, offs_n_base, offs_d, k_len, stride_kn, stride_kd, d_head,
                qpos, first, end, pad_row, sm_scale, softcap, slope, True, HAS_PAD, TRANSFORM,
                SOFTCAP, ALIBI, FAST_TANH, DOT_PREC,
            )  # fmt: skip
            offs_n = start_n + offs_n_base
            keep = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
            p = tl.math.exp2(s * qk_scale - m_safe[:, None])
            c += tl.sum(tl.where(keep, p, 0.0), axis=1)
        return c

    @triton.jit
    def _fold_learned_sink(m_i, l_i, u_i, z2):
        """Fold the learned sink logit ``z2`` (base 2) into (m, l, u) like one more key without
        a value. Returns (m, l, u, alpha, e_z): the keys' terms are rescaled by ``alpha`` and the
        sink's own term is ``e_z``."""
        has_key = l_i > 0
        m_f = tl.maximum(m_i, z2)
        alpha = tl.math.exp2(m_i - m_f)  # 0 for rows without keys
        shift = tl.where(has_key, m_i - m_f, 0.0)
        e_z = tl.math.exp2(z2 - m_f)
        u_i = alpha * (u_i + shift * l_i) + e_z * (z2 - m_f)
        return m_f, alpha * l_i + e_z, u_i, alpha, e_z

    @triton.jit
    def _store_row_stats(LSE, ENT, MAXP, ARG, row, row_ok, m_i, l_i, u_i, arg_i, key_max, has_key):
        """lse, entropy, max_prob and argmax of rows with running (m, l, u); returns the rows
        that saw anything and their l (1 where they did not)."""
        valid = l_i > 0
        l_safe = tl.where(valid, l_i, 1.0)
        ln2 = 0.6931471805599453
        tl.store(
            LSE + row,
            tl.where(valid, (m_i + tl.math.log2(l_safe)) * ln2, -float("inf")),
            mask=row_ok,
        )
        tl.store(ENT + row, tl.where(valid, tl.log(l_safe) - ln2 * u_i / l_safe, 0.0), mask=row_ok)
        tl.store(MAXP + row, tl.where(has_key, key_max / l_safe, 0.0), mask=row_ok)
        tl.store(ARG + row, tl.where(has_key, arg_i, -1).to(tl.int64), mask=row_ok)
        return valid, l_safe

    @triton.jit
    def _query_block(
        Q,
        K,
        QPOS,
        PAD,
        BOUNDS,
        CHUNK_OFF,
        SLOPES,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_pad_b,
        stride_bounds_b,
        n_heads,
        group,
        q_len,
        k_len,
        window,
        chunk,
        d_head: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CHUNK: tl.constexpr,
        ALIBI: tl.constexpr,
        DEFAULT_POS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Where a program of the query-block kernels (`_stats_fwd`, `kernels.top_keys`) starts:
        grid axis 0 is the query block (launched heaviest first, which shortens the tail of
        causal grids), axis 1 the batch × head.

        Returns its batch ``b``, head ``h``, kv head, rows ``offs_m`` [BLOCK_M] and which are
        real, their key positions ``qpos`` (by default the last q_len keys, no tensor needed)
        and visible key ranges ``[first, end)``, the ALiBi slope, the q tile [BLOCK_M, BLOCK_D],
        the K and padding rows of the kv head, and the key runs ``(lo, un_lo, un_hi, hi)``
        (`kernels.blocks`: masked [lo, un_lo), unmasked [un_lo, un_hi), masked [un_hi, hi);
        every other key block is hidden from all rows and skipped).
        """
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        kv_h = h // group  # GQA: the HF repeat_kv rule
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < q_len
        if DEFAULT_POS:
            qpos = tl.where(row_ok, offs_m + (k_len - q_len), -1)
        else:
            qpos = tl.load(QPOS + offs_m, mask=row_ok, other=-1).to(tl.int32)
        chunk_off = 0
        if HAS_CHUNK and HAS_PAD:  # chunks start at the row's first real token
            chunk_off = tl.load(CHUNK_OFF + b).to(tl.int32)
        first, end = _row_range(qpos, k_len, window, chunk, chunk_off, CAUSAL, HAS_WINDOW,
                                HAS_CHUNK)  # fmt: skip
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + h).to(tl.float32)
        q_ptrs = (
            Q
            + b.to(tl.int64) * stride_qb
            + h.to(tl.int64) * stride_qh
            + offs_m[:, None] * stride_qm
            + offs_d[None, :] * stride_qd
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < d_head), other=0.0)
        K_head = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
        pad_row = PAD + b.to(tl.int64) * stride_pad_b
        bounds = BOUNDS + b.to(tl.int64) * stride_bounds_b + pid_m * 4
        lo = tl.load(bounds)
        un_lo = tl.load(bounds + 1)
        un_hi = tl.load(bounds + 2)
        hi = tl.load(bounds + 3)
        return (
            b,
            h,
            kv_h,
            offs_m,
            row_ok,
            qpos,
            first,
            end,
            slope,
            q,
            K_head,
            pad_row,
            lo,
            un_lo,
            un_hi,
            hi,
        )

    @triton.jit
    def _stats_fwd(
        Q,
        K,
        V,
        QPOS,
        PAD,
        BOUNDS,
        CHUNK_OFF,
        SINKS,
        SLOPES,
        SPANS,
        LSE,
        ENT,
        MAXP,
        ARG,
        SINK,
        OUTSIDE,
        LEARNED,
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
        stride_os,
        stride_pad_b,
        stride_bounds_b,
        stride_span_b,
        n_heads,
        group,
        q_len,
        k_len,
        n_spans,
        sink_size,
        recent_window,
        window,
        chunk,
        qk_scale,
        sm_scale,
        softcap,
        split_len,
        d_head: tl.constexpr,
        d_v: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_PAD: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_CHUNK: tl.constexpr,
        HAS_SINKS: tl.constexpr,
        HAS_OUTSIDE: tl.constexpr,
        TRANSFORM: tl.constexpr,
        SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr,
        FAST_TANH: tl.constexpr,
        RETURN_OUTPUT: tl.constexpr,
        DEFAULT_POS: tl.constexpr,
        DOT_PREC: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        (b, h, kv_h, offs_m, row_ok, qpos, first, end, slope, q, K_head, pad_row, lo, un_lo, un_hi,
         hi) = _query_block(
            Q, K, QPOS, PAD, BOUNDS, CHUNK_OFF, SLOPES, stride_qb, stride_qh, stride_qm, stride_qd,
            stride_kb, stride_kh, stride_pad_b, stride_bounds_b, n_heads, group, q_len, k_len,
            window, chunk, d_head, CAUSAL, HAS_PAD, HAS_WINDOW, HAS_CHUNK, ALIBI, DEFAULT_POS,
            BLOCK_M, BLOCK_D,
        )  # fmt: skip
        offs_n_base = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        V_head = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
        if SPLIT:  # this program's share of the keys: [split_start, split_start + split_len)
            split_start = tl.program_id(2) * split_len
            lo = tl.minimum(tl.maximum(lo, split_start), split_start + split_len)
            un_lo = tl.minimum(tl.maximum(un_lo, split_start), split_start + split_len)
            un_hi = tl.minimum(tl.maximum(un_hi, split_start), split_start + split_len)
            hi = tl.minimum(tl.maximum(hi, split_start), split_start + split_len)

        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        arg_i = tl.full([BLOCK_M], -1, dtype=tl.int32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start_n in range(lo, un_lo, BLOCK_N):
            m_i, l_i, u_i, arg_i, acc = _main_block(
                q, K_head, V_head, start_n, offs_n_base, offs_d, offs_dv, k_len, stride_kn,
                stride_kd, stride_vn, stride_vd, d_head, d_v, qpos, first, end, pad_row,
                qk_scale, sm_scale, softcap, slope, m_i, l_i, u_i, arg_i, acc, True, HAS_PAD,
                TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, RETURN_OUTPUT, DOT_PREC,
            )  # fmt: skip
        for start_n in range(un_lo, un_hi, BLOCK_N):
            m_i, l_i, u_i, arg_i, acc = _main_block(
                q, K_head, V_head, start_n, offs_n_base, offs_d, offs_dv, k_len, stride_kn,
                stride_kd, stride_vn, stride_vd, d_head, d_v, qpos, first, end, pad_row,
                qk_scale, sm_scale, softcap, slope, m_i, l_i, u_i, arg_i, acc, False, HAS_PAD,
                TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, RETURN_OUTPUT, DOT_PREC,
            )  # fmt: skip
        for start_n in range(un_hi, hi, BLOCK_N):
            m_i, l_i, u_i, arg_i, acc = _main_block(
                q, K_head, V_head, start_n, offs_n_base, offs_d, offs_dv, k_len, stride_kn,
                stride_kd, stride_vn, stride_vd, d_head, d_v, qpos, first, end, pad_row,
                qk_scale, sm_scale, softcap, slope, m_i, l_i, u_i, arg_i, acc, True, HAS_PAD,
                TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, RETURN_OUTPUT, DOT_PREC,
            )  # fmt: skip

        has_key = l_i > 0
        keys = l_i  # Σ over keys of 2^{s2 - m}
        key_max = tl.where(has_key, 1.0, 0.0)  # 2^{m_keys - m}: the largest key's share of l
        row = (b * n_heads + h).to(tl.int64) * q_len + offs_m  # [BLOCK_M] into [B, H, q_len]
        if SPLIT:
            # partial sums over this share of the keys, relative to its own max, in the
            # [n_splits, B, H, q_len] partial buffers (`_combine_splits` merges them): m in LSE,
            # u in ENT, l in MAXP; the mass sums below unnormalised; the output unnormalised
            row += tl.program_id(2).to(tl.int64) * tl.num_programs(1) * q_len
            tl.store(LSE + row, m_i, mask=row_ok)
            tl.store(ENT + row, u_i, mask=row_ok)
            tl.store(MAXP + row, l_i, mask=row_ok)
            tl.store(ARG + row, arg_i.to(tl.int64), mask=row_ok)
            valid = has_key
            denom = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        else:
            if HAS_SINKS:  # the learned sink: one more logit, no value
                z2 = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
                m_i, l_i, u_i, key_max, e_z = _fold_learned_sink(m_i, l_i, u_i, z2)
                keys = key_max * keys
                acc = acc * key_max[:, None]
                tl.store(LEARNED + row, e_z / l_i, mask=row_ok)
            valid, denom = _store_row_stats(
                LSE, ENT, MAXP, ARG, row, row_ok, m_i, l_i, u_i, arg_i, key_max, has_key
            )
        m_safe = tl.where(valid, m_i, 0.0)
        if RETURN_OUTPUT:
            out = tl.where(valid[:, None], acc / denom[:, None], 0.0)
            o_ptrs = (
                OUT
                + tl.program_id(2).to(tl.int64) * stride_os
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

        # Second, short walk with the final max (the share's own max when split), inside
        # [lo, hi): sinks, spans, recent window.
        zero = tl.zeros([BLOCK_M], dtype=tl.int32)
        c_sink = _range_sum(
            q, K_head, lo, tl.minimum(sink_size, hi), offs_n_base, offs_d, k_len, stride_kn,
            stride_kd, d_head, qpos, first, end, pad_row, qk_scale, sm_scale, softcap, slope,
            m_safe, zero, zero + sink_size, HAS_PAD, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH,
            DOT_PREC, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        tl.store(SINK + row, tl.where(valid, c_sink / denom, 0.0), mask=row_ok)
        if HAS_OUTSIDE:
            if CAUSAL:
                # recent = visible keys j >= S with j > pos - W; outside = keys - sink - recent
                min_pos = tl.min(tl.where(row_ok, qpos, k_len), axis=0)
                row_lo = tl.maximum(qpos - recent_window + 1, sink_size)
                lo_recent = tl.maximum(tl.maximum(min_pos - recent_window + 1, sink_size), lo)
                c_recent = _range_sum(
                    q, K_head, lo_recent, hi, offs_n_base, offs_d, k_len, stride_kn, stride_kd,
                    d_head, qpos, first, end, pad_row, qk_scale, sm_scale, softcap, slope,
                    m_safe, row_lo, zero + k_len, HAS_PAD, TRANSFORM, SOFTCAP, ALIBI, FAST_TANH,
                    DOT_PREC, BLOCK_M, BLOCK_N,
                )  # fmt: skip
                outside = keys - c_sink - c_recent
                if not SPLIT:  # partial sums are clamped once merged
                    outside = tl.maximum(outside, 0.0)
            else:
                row_hi = qpos - recent_window + 1
                hi_out = tl.minimum(tl.max(qpos, axis=0) - recent_window + 1, hi)
                outside = _range_sum(
                    q, K_head, tl.maximum(sink_size, lo), hi_out, offs_n_base, offs_d, k_len,
                    stride_kn, stride_kd, d_head, qpos, first, end, pad_row, qk_scale,
                    sm_scale, softcap, slope, m_safe, zero + sink_size, row_hi, HAS_PAD,
                    TRANSFORM, SOFTCAP, ALIBI, FAST_TANH, DOT_PREC, BLOCK_M, BLOCK_N,
                )  # fmt: skip
            tl.store(OUTSIDE + row, tl.where(valid, outside / denom, 0.0), mask=row_ok)
        span_base = SPANS + b.to(tl.int64) * stride_span_b
        for n in range(0, n_spans):
            start = tl.load(span_base + 2 * n).to(tl.int32)
            stop = tl.load(span_base + 2 * n + 1).to(tl.int32)
            c_span = _range_sum(
                q, K_head, tl.maximum(start, lo), tl.minimum(stop, hi), offs_n_base, offs_d,
                k_len, stride_kn, stride_kd, d_head, qpos, first, end, pad_row, qk_scale,
                sm_scale, softcap, slope, m_safe, zero + start, zero + stop, HAS_PAD, TRANSFORM,
                SOFTCAP, ALIBI, FAST_TANH, DOT_PREC, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            tl.store(
                SPAN_MASS + row * n_spans + n, tl.where(valid, c_span / denom, 0.0), mask=row_ok
            )

    @triton.jit
    def _combine_splits(
        PM,
        PU,
        PL,
        PARG,
        PSINK,
        POUTSIDE,
        PSPAN,
        PACC,
        SINKS,
        LSE,
        ENT,
        MAXP,
        ARG,
        SINK,
        OUTSIDE,
        LEARNED,
        SPAN_MASS,
        OUT,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        n_rows,
        n_heads,
        q_len,
        n_splits,
        n_spans,
        d_v: tl.constexpr,
        HAS_SINKS: tl.constexpr,
        HAS_OUTSIDE: tl.constexpr,
        RETURN_OUTPUT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        """Merge the partial sums of the key shares of `_stats_fwd` (SPLIT) into the statistics.

        Each share s holds, for row r, its max ``m_s`` and sums relative to it; with the overall
        max ``m`` and weights ``w_s = 2^{m_s - m}``: ``l = Σ w_s l_s``, ``u = Σ w_s (u_s + (m_s -
        m) l_s)``, every mass and the output ``Σ w_s x_s``; the argmax is that of the first share
        (smallest keys) whose max is ``m``. Then the learned sink and the normalisation, as in
        `_stats_fwd`.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] into [B, H, q_len]
        ok = rows < n_rows
        offs_dv = tl.arange(0, BLOCK_DV)
        m = tl.full([BLOCK_R], -float("inf"), dtype=tl.float32)
        for sp in range(0, n_splits):
            m = tl.maximum(m, tl.load(PM + sp * n_rows + rows, mask=ok, other=-float("inf")))
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        u_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        c_sink = tl.zeros([BLOCK_R], dtype=tl.float32)
        outside = tl.zeros([BLOCK_R], dtype=tl.float32)
        arg_i = tl.full([BLOCK_R], -1, dtype=tl.int64)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
        for sp in range(0, n_splits):
            at = sp * n_rows + rows
            m_s = tl.load(PM + at, mask=ok, other=-float("inf"))
            l_s = tl.load(PL + at, mask=ok, other=0.0)
            w = tl.math.exp2(m_s - m_safe)  # 0 for shares without keys
            has = l_s > 0
            l_i += w * l_s
            u_i += tl.where(has, w * (tl.load(PU + at, mask=ok, other=0.0) + (m_s - m_safe) * l_s),
                            0.0)  # fmt: skip
            first = has & (m_s == m) & (arg_i < 0)
            arg_i = tl.where(first, tl.load(PARG + at, mask=ok, other=-1), arg_i)
            c_sink += w * tl.load(PSINK + at, mask=ok, other=0.0)
            if HAS_OUTSIDE:
                outside += w * tl.load(POUTSIDE + at, mask=ok, other=0.0)
            if RETURN_OUTPUT:
                part = tl.load(PACC + at[:, None] * d_v + offs_dv[None, :],
                               mask=ok[:, None] & (offs_dv[None, :] < d_v), other=0.0)  # fmt: skip
                acc += w[:, None] * part
        has_key = l_i > 0
        key_max = tl.where(has_key, 1.0, 0.0)
        m_i = m
        if HAS_SINKS:
            h = (rows // q_len) % n_heads
            z2 = tl.load(SINKS + h, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634
            m_i, l_i, u_i, key_max, e_z = _fold_learned_sink(m_i, l_i, u_i, z2)
            c_sink *= key_max
            outside *= key_max
            acc = acc * key_max[:, None]
            tl.store(LEARNED + rows, e_z / l_i, mask=ok)
        valid, l_safe = _store_row_stats(
            LSE, ENT, MAXP, ARG, rows, ok, m_i, l_i, u_i, arg_i, key_max, has_key
        )
        tl.store(SINK + rows, tl.where(valid, c_sink / l_safe, 0.0), mask=ok)
        if HAS_OUTSIDE:
            tl.store(OUTSIDE + rows, tl.where(valid, tl.maximum(outside, 0.0) / l_safe, 0.0),
                     mask=ok)  # fmt: skip
        for n in range(0, n_spans):
            c_span = tl.zeros([BLOCK_R], dtype=tl.float32)
            for sp in range(0, n_splits):
                at = sp * n_rows + rows
                w = tl.math.exp2(tl.load(PM + at, mask=ok, other=-float("inf")) - m_safe)
                c_span += w * tl.load(PSPAN + at * n_spans + n, mask=ok, other=0.0)
            c_span = c_span * key_max if HAS_SINKS else c_span
            tl.store(SPAN_MASS + rows * n_spans + n, tl.where(valid, c_span / l_safe, 0.0),
                     mask=ok)  # fmt: skip
        if RETURN_OUTPUT:
            bh = rows // q_len
            o_ptrs = (
                OUT
                + ((bh // n_heads).to(tl.int64) * stride_ob)[:, None]
                + ((bh % n_heads).to(tl.int64) * stride_oh)[:, None]
                + ((rows % q_len).to(tl.int64) * stride_om)[:, None]
                + offs_dv[None, :] * stride_od
            )
            out = tl.where(valid[:, None], acc / l_safe[:, None], 0.0)
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty),
                     mask=ok[:, None] & (offs_dv[None, :] < d_v))  # fmt: skip


def _next_pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    # cached: looking the properties up costs microseconds on every decode step's launch
    return torch.cuda.get_device_properties(device).multi_processor_count


def key_splits(programs: int, k_len: int, block_n: int, multiprocessors: int) -> int:
    """How many shares of the keys each query block's work is split into.

    A grid of fewer programs than twice the multiprocessors (a decoding step: one query per
    head) leaves most of the GPU idle while each program walks every key; splitting the keys, as
    FlashDecoding does, gives about four programs per multiprocessor, each over at least four
    key blocks, and one merge launch (`_combine_splits`).
    """
    if programs >= 2 * multiprocessors:
        return 1
    return max(1, min(-(-4 * multiprocessors // programs), k_len // (4 * block_n)))


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
    splits: int | None = None,
) -> AttentionStats:
    """Launch the kernel on validated arguments; ``config`` overrides `block_sizes`, ``splits``
    `key_splits` (default: by the grid's size on a GPU, 1 in the interpreter).

    The host side is a handful of allocations and one launch (two when the keys are split), no
    other kernels and no sync (the key-block bounds of the default positions are cached): at
    4K tokens the whole pass takes a few hundred microseconds, so every extra torch op shows.
    """
    batch, n_heads, q_len, d_head = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    dev = q.device
    has_outside, has_sinks = recent_window is not None, a.sinks is not None
    # lse, entropy, max_prob, sink (, outside) (, learned sink): each [batch, n_heads, q_len]
    n_f32 = 4 + has_outside + has_sinks
    fields = torch.empty(n_f32, batch, n_heads, q_len, dtype=torch.float32, device=dev).unbind(0)
    lse, ent, maxp, sink = fields[:4]
    outside = fields[4] if has_outside else None
    learned = fields[-1] if has_sinks else None
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
    result = AttentionStats(lse, ent, maxp, arg, sink, span_mass, outside, out, learned)
    if q_len == 0:
        return result
    pad = a.key_padding_mask
    if pad is not None:
        pad = pad.view(torch.int8) if pad.stride(1) == 1 else pad.contiguous().view(torch.int8)
    vv = v if v is not None else k  # unread dummy when no output is requested
    block_m, block_n, warps, stages = config or block_sizes(d_head, q.is_cuda, return_output, q_len)
    bounds = key_blocks(
        a.q_positions, q_len, k_len, causal=causal, window=a.window, chunk=a.chunk,
        chunk_start=a.chunk_start, full_blocks=pad is None, block_m=block_m, block_n=block_n,
        device=dev,
    )  # fmt: skip
    transform = a.softcap is not None or a.alibi_slopes is not None
    n_q_blocks = triton.cdiv(q_len, block_m)
    if splits is None:
        programs = n_q_blocks * batch * n_heads
        splits = key_splits(programs, k_len, block_n, _multiprocessors(dev)) if q.is_cuda else 1
    split_len = triton.cdiv(triton.cdiv(k_len, splits), block_n) * block_n
    splits = triton.cdiv(k_len, split_len) if k_len else 1
    # with split keys the kernel writes each share's partial sums here, merged afterwards
    if splits > 1:
        rows = (splits, batch, n_heads, q_len)
        part = torch.empty(4 + has_outside, *rows, dtype=torch.float32, device=dev).unbind(0)
        p_arg = torch.empty(rows, dtype=torch.int64, device=dev)
        p_span = torch.empty(*rows, n_spans, dtype=torch.float32, device=dev) if n_spans else None
        p_acc = torch.empty(*rows, d_v, dtype=torch.float32, device=dev) if return_output else None
        targets = (part[0], part[1], part[2], p_arg, part[3],
                   part[4] if has_outside else None, p_span, p_acc)  # fmt: skip
    else:
        targets = (lse, ent, maxp, arg, sink, outside, span_mass, out)
    t_lse, t_ent, t_maxp, t_arg, t_sink, t_outside, t_span, t_out = targets
    oo = t_out if t_out is not None else q  # unwritten dummy
    o_strides = (*oo.stride()[-4:], oo.stride(0) if splits > 1 else 0)
    _stats_fwd[(n_q_blocks, batch * n_heads, splits)](
        q, k, vv,
        lse if a.q_positions is None else a.q_positions,  # unread with default positions
        pad if pad is not None else lse,  # unread dummies from here
        bounds,
        a.chunk_start if a.chunk_start is not None else lse,
        a.sinks if has_sinks else lse,
        a.alibi_slopes if a.alibi_slopes is not None else lse,
        a.spans if n_spans else lse,
        t_lse, t_ent, t_maxp, t_arg, t_sink,
        t_outside if has_outside else lse,
        learned if has_sinks else lse,
        t_span if n_spans else lse,
        oo,
        *q.stride(), *k.stride(), *vv.stride(), *o_strides,
        pad.stride(0) if pad is not None else 0,
        bounds.stride(0) if bounds.shape[0] > 1 else 0,
        a.spans.stride(0) if n_spans and a.spans.shape[0] > 1 else 0,
        n_heads, n_heads // n_kv, q_len, k_len, n_spans, sink_size,
        recent_window or 1, a.window or 1, a.chunk or 1,
        1.0 if transform else a.scale * _LOG2E,  # transformed scores come out in base 2
        a.scale, a.softcap or 1.0, split_len,
        d_head=d_head, d_v=d_v, CAUSAL=causal, HAS_PAD=pad is not None,
        HAS_WINDOW=a.window is not None, HAS_CHUNK=a.chunk is not None, HAS_SINKS=has_sinks,
        HAS_OUTSIDE=has_outside, TRANSFORM=transform, SOFTCAP=a.softcap is not None,
        ALIBI=a.alibi_slopes is not None, FAST_TANH=fast_tanh(q.dtype, q.is_cuda),
        RETURN_OUTPUT=return_output, DEFAULT_POS=a.q_positions is None,
        DOT_PREC=dot_precision(q.dtype), SPLIT=splits > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_next_pow2(d_head), BLOCK_DV=_next_pow2(d_v),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if splits > 1:
        n_rows = batch * n_heads * q_len
        oo = out if out is not None else q
        block_r = 32
        _combine_splits[(triton.cdiv(n_rows, block_r),)](
            t_lse, t_ent, t_maxp, t_arg, t_sink,
            t_outside if has_outside else lse,
            t_span if n_spans else lse,
            t_out if return_output else lse,
            a.sinks if has_sinks else lse,
            lse, ent, maxp, arg, sink,
            outside if has_outside else lse,
            learned if has_sinks else lse,
            span_mass if n_spans else lse,
            oo, *oo.stride(),
            n_rows, n_heads, q_len, splits, n_spans,
            d_v=d_v, HAS_SINKS=has_sinks, HAS_OUTSIDE=has_outside, RETURN_OUTPUT=return_output,
            BLOCK_R=block_r, BLOCK_DV=_next_pow2(d_v),
        )  # fmt: skip
    return result


def triton_args(q: Tensor, k: Tensor, **kwargs) -> reference._Args:
    """The arguments of a kernel call on the Triton backend, checked once for every kernel
    (`reference.check_args` without materialising default positions), plus what only the
    kernels need: fp32/fp16/bf16 inputs and a positive, finite scale."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the triton backend takes fp32/fp16/bf16 inputs, got {q.dtype}")
    a = check_args(q, k, materialize_positions=False, **kwargs)
    if not a.scale > 0 or not math.isfinite(a.scale):
        raise ValueError(f"scale must be positive and finite, got {a.scale}")
    return a


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
    backend: str = "auto",
) -> AttentionStats:
    """Per-(batch, head, query) attention statistics without forming the attention pattern.

    Args:
        q: ``[batch, n_heads, q_len, d_head]``, fp32/fp16/bf16 (fp32 accumulation).
        k: ``[batch, n_kv_heads, k_len, d_head]``; ``n_heads % n_kv_heads == 0`` (GQA: query head
            ``h`` reads kv head ``h // (n_heads // n_kv_heads)``).
        v: ``[batch, n_kv_heads, k_len, d_v]`` (``d_v`` may differ from ``d_head``, as in MLA);
            needed only with ``return_output``.
        causal: mask keys after each query's position.
        scale: score scale, default ``d_head ** -0.5``; must be positive.
        sink_size: S; ``sink_mass`` is the mass on keys ``j < S``.
        recent_window: W; ``outside_mass`` is the mass on keys ``S <= j <= pos - W``. None skips it.
        spans: ``[n_spans, 2]`` or ``[batch, n_spans, 2]`` ``[start, end)`` key ranges.
        q_positions: ``[q_len]`` absolute key positions of the queries; default
            ``arange(k_len - q_len, k_len)``. A subset of positions (e.g. the answer tokens)
            scores only those queries against all keys.
        key_padding_mask: bool ``[batch, k_len]``, True for real tokens.
        window: sliding window, the ``sliding_window`` a Hugging Face model hands its attention
            function: causal keys ``pos - window < j <= pos``, bidirectional
            ``|pos - j| < window``. Key blocks outside every row's window are skipped.
        chunk: chunked attention (Llama 4's ``attention_chunk_size``): keys of the query's chunk
            only, chunks counted from each row's first real token. Skipped like ``window``.
        softcap: ``c``: logits ``c · tanh(scale · q·k / c)`` (Gemma 2's ``attn_logit_softcapping``).
        sinks: ``[n_heads]`` learned sink logits (gpt-oss ``sinks``): one more softmax slot per
            head without a value; adds ``learned_sink_mass``.
        alibi_slopes: ``[n_heads]`` ALiBi slopes ``m_h``: logits ``+ m_h · (j - pos)``.
        return_output: also return the attention output (``[batch, n_heads, q_len, d_v]``; with
            the Triton backend a transposed view of a ``[batch, q_len, n_heads, d_v]`` buffer,
            the layout attention modules hand on).
        backend: ``"auto"`` (Triton for CUDA tensors when triton imports, else the torch
            reference), ``"triton"`` or ``"torch"``.

    Returns:
        `AttentionStats`; definitions (including how the learned sink enters ``lse``, entropy
        and ``max_prob``), tie and fully-masked-row conventions in `kernels.reference`.
    """
    check_qk(q, k, v)
    if return_output and v is None:
        raise ValueError("return_output=True needs v")
    variant = dict(window=window, chunk=chunk, softcap=softcap, sinks=sinks,
                   alibi_slopes=alibi_slopes)  # fmt: skip
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
            **variant,
        )
    a = triton_args(
        q,
        k,
        scale=scale,
        q_positions=q_positions,
        key_padding_mask=key_padding_mask,
        spans=spans,
        sink_size=sink_size,
        recent_window=recent_window,
        **variant,
    )
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
