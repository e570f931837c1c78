"""Loop bounds of the streamed kernels: which blocks each program visits, and which it skips.

A query at position ``p`` sees, before padding, the keys of one interval
``first(p) <= j < end(p)`` (`kernels.reference.key_range`: causal mask, sliding window, chunks).
Both ends never decrease as ``p`` grows, so for a block of queries with positions in
``[p_min, p_max]``:

- some row sees a key in ``[first(p_min), end(p_max))`` -- every key block outside is skipped;
- every row sees every key in ``[first(p_max), end(p_min))`` -- key blocks inside need no
  per-score mask.

Each program of `kernels.attention_stats` walks its key range in three loops, masked, unmasked,
masked, over the bounds ``(lo, un_lo, un_hi, hi)``::

    keys  0 ......... lo ==masked== un_lo ==unmasked== un_hi ==masked== hi ......... k_len
          (skipped)                                                         (skipped)

with ``lo``, ``un_lo``, ``un_hi`` multiples of ``BLOCK_N`` and ``hi`` the end of the last visited
key (an empty unmasked range is ``un_lo = un_hi = lo``). A sliding window of W keys thus costs
O(L · (W + BLOCK_M)) instead of O(L²). `kernels.received` does the transpose: per key block, the
query rows (of sorted positions) that see some of its keys, and those that see all of them.

The bounds are computed here with a few torch ops on the kernels' device (no GPU sync), and
cached for the default query positions, where they depend only on the shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.reference import key_range

__all__ = ["key_blocks", "query_blocks", "visited_blocks"]

# Bounds for the default positions, by every argument they depend on: each layer of a model
# asks for the same ones, and recomputing them would be ~20 small launches per call.
_CACHE: dict[tuple, Tensor] = {}


def _cached(key: tuple, build) -> Tensor:
    if key not in _CACHE:
        if len(_CACHE) >= 64:
            _CACHE.clear()
        _CACHE[key] = build()
    return _CACHE[key]


def _pack(lo: Tensor, un_lo: Tensor, un_hi: Tensor, hi: Tensor, block: int) -> Tensor:
    """Align the bounds to ``block`` and stack them: [batch or 1, n_blocks, 4] int32.

    ``lo``/``hi``: the elements some row (column) of the block needs; ``un_lo``/``un_hi``: the
    elements every one needs, an empty range where ``un_hi <= un_lo``.
    """
    lo_b = lo // block * block
    hi = torch.where(hi > lo, hi, lo_b)  # nothing visible: no loop runs
    un_lo = (un_lo + block - 1) // block * block
    un_hi = un_hi // block * block
    empty = un_hi <= un_lo
    un_lo = torch.where(empty, lo_b, un_lo)
    un_hi = torch.where(empty, lo_b, un_hi)
    shape = torch.broadcast_shapes(lo_b.shape, hi.shape, un_lo.shape, un_hi.shape)
    return torch.stack([t.expand(shape) for t in (lo_b, un_lo, un_hi, hi)], -1).int().contiguous()


def key_blocks(
    q_positions: Tensor | None,
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    chunk: int | None,
    chunk_start: Tensor | None,
    full_blocks: bool,
    block_m: int,
    block_n: int,
    device: torch.device,
) -> Tensor:
    """Per query block, the key bounds ``(lo, un_lo, un_hi, hi)`` of the stats kernel.

    Args:
        q_positions: ``[q_len]`` key positions of the queries (any order), or None for the
            default ``arange(k_len - q_len, k_len)``.
        causal, window, chunk, chunk_start: the visibility rule (`kernels.reference.key_range`).
        full_blocks: False when per-key padding must be masked anyway: no unmasked loop.
        block_m, block_n: the kernel's query and key block sizes.

    Returns:
        ``[batch or 1, cdiv(q_len, block_m), 4]`` int32 on ``device`` (``batch`` rows only with
        ``chunk_start``).
    """

    def build() -> Tensor:
        pos = q_positions
        if pos is None:
            pos = torch.arange(k_len - q_len, k_len, device=device)
        n_blocks = -(-q_len // block_m)
        tail = pos[-1:].expand(n_blocks * block_m - q_len)  # the last row again: same min/max
        rows = torch.cat([pos, tail]).view(n_blocks, block_m)  # [n_q_blocks, block_m]
        rule = dict(causal=causal, window=window, chunk=chunk, chunk_start=chunk_start)
        first_min, end_min = key_range(rows.amin(1), k_len, **rule)  # [batch or 1, n_q_blocks]
        first_max, end_max = key_range(rows.amax(1), k_len, **rule)
        if not full_blocks:
            end_min = first_max  # an empty unmasked range
        return _pack(first_min, first_max, end_min, end_max, block_n)

    if q_positions is not None or chunk_start is not None:
        return build()
    key = ("k", q_len, k_len, causal, window, chunk, full_blocks, block_m, block_n, str(device))
    return _cached(key, build)


def query_blocks(
    q_positions: Tensor | None,
    sorted_positions: bool,
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    window: int | None,
    chunk: int | None,
    chunk_start: Tensor | None,
    block_m: int,
    block_n: int,
    device: torch.device,
) -> Tensor:
    """Per key block, the query-row bounds ``(lo, un_lo, un_hi, hi)`` of the received kernel.

    Rows are those of q (positions ``q_positions``, default ``arange(k_len - q_len, k_len)``).
    With sorted positions the rows that see some key of a block are contiguous, found by binary
    search on the rows' ``first``/``end`` (both non-decreasing); unsorted positions visit every
    row with the mask. The unmasked range never reaches the last, partial query block.

    Returns:
        ``[batch or 1, cdiv(k_len, block_n), 4]`` int32 on ``device``.
    """

    def build() -> Tensor:
        n_kb = -(-k_len // block_n)
        if not sorted_positions:  # every row, every block masked
            bounds = torch.tensor([0, 0, 0, q_len], dtype=torch.int32, device=device)
            return bounds.expand(1, n_kb, 4).contiguous()
        pos = q_positions
        if pos is None:
            pos = torch.arange(k_len - q_len, k_len, device=device)
        first, end = key_range(
            pos, k_len, causal=causal, window=window, chunk=chunk, chunk_start=chunk_start
        )  # [batch or 1, q_len], non-decreasing along the rows
        batch = first.shape[0]
        n0 = torch.arange(0, k_len, block_n, device=device).expand(batch, n_kb).contiguous()
        n1 = (n0 + block_n).clamp(max=k_len) - 1  # last key of each block
        end = end.expand(batch, q_len).contiguous()
        first = first.expand(batch, q_len).contiguous()

        def rows_with(seq: Tensor, keys: Tensor) -> Tensor:  # rows i with seq_i <= key
            return torch.searchsorted(seq, keys, right=True)

        # some key: end_i > n0 and first_i <= n1; all keys: end_i > n1 and first_i <= n0
        lo, hi = rows_with(end, n0), rows_with(first, n1)
        un_lo, un_hi = rows_with(end, n1), rows_with(first, n0)
        un_hi = un_hi.clamp(max=q_len // block_m * block_m)  # the tail block stays masked
        return _pack(lo, un_lo, un_hi, hi, block_m)

    if q_positions is not None or chunk_start is not None:
        return build()
    key = ("q", q_len, k_len, causal, window, chunk, block_m, block_n, str(device))
    return _cached(key, build)


def visited_blocks(bounds: Tensor, block: int) -> Tensor:
    """How many blocks each program visits: [batch or 1, n_programs] int64 from `key_blocks` or
    `query_blocks` bounds (the kernels' loops together cover ``[lo, hi)``)."""
    lo, hi = bounds[..., 0].long(), bounds[..., 3].long()
    return ((hi - lo).clamp(min=0) + block - 1) // block
