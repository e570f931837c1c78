"""The kernels' loop bounds (`kernels.blocks`): they cover every visible (query, key) pair,
skip every block no row sees, leave unmasked only blocks every row sees in full -- a property
over random shapes and masks -- and make a sliding window cost O(L · W) blocks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.blocks import key_blocks, query_blocks, visited_blocks


@st.composite
def layouts(draw):
    """Random shapes, query positions, masking rule, left padding and block sizes."""
    k_len = draw(st.integers(1, 48))
    if draw(st.booleans()):
        q_len = draw(st.integers(1, k_len))
        positions = None
        pos = torch.arange(k_len - q_len, k_len)
    else:
        q_len = draw(st.integers(1, 20))
        pos = torch.tensor(draw(st.lists(st.integers(0, k_len - 1), min_size=q_len,
                                         max_size=q_len)))  # fmt: skip
        if draw(st.booleans()):
            pos = pos.sort().values
        positions = pos
    chunk = draw(st.one_of(st.none(), st.integers(1, 12)))
    left = None
    if chunk is not None and draw(st.booleans()):
        left = torch.tensor(draw(st.lists(st.integers(0, k_len), min_size=2, max_size=2)))
    return dict(
        k_len=k_len,
        q_len=q_len,
        positions=positions,
        pos=pos,
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 12))),
        chunk=chunk,
        left=left,
        block_m=draw(st.sampled_from([1, 2, 4, 8])),
        block_n=draw(st.sampled_from([1, 2, 4, 8])),
    )


def _rule(lay):
    return dict(causal=lay["causal"], window=lay["window"], chunk=lay["chunk"])


@settings(max_examples=300, deadline=None)
@given(lay=layouts(), full_blocks=st.booleans())
def test_key_blocks_cover_skip_and_unmask_exactly(lay, full_blocks, dense_visibility):
    vis = dense_visibility(lay["pos"], lay["k_len"], left_padding=lay["left"], **_rule(lay))
    bounds = key_blocks(
        lay["positions"], lay["q_len"], lay["k_len"], **_rule(lay), chunk_start=lay["left"],
        full_blocks=full_blocks, block_m=lay["block_m"], block_n=lay["block_n"],
        device=torch.device("cpu"),
    )  # fmt: skip
    bm, bn = lay["block_m"], lay["block_n"]
    vis = vis.expand(bounds.shape[0], -1, -1)  # [batch or 1, q_len, k_len]
    for b in range(bounds.shape[0]):
        for m in range(bounds.shape[1]):
            lo, un_lo, un_hi, hi = bounds[b, m].tolist()
            rows = vis[b, m * bm : (m + 1) * bm]  # [rows, k_len]
            seen = rows.any(0).nonzero().flatten()
            assert lo % bn == 0 and un_lo % bn == 0 and un_hi % bn == 0
            assert lo <= un_lo <= un_hi <= hi
            # the loops cover the keys some row sees, and start/stop at their blocks
            assert seen.numel() > 0  # a query always sees its own position
            assert lo == seen.min() // bn * bn and hi == seen.max() + 1
            # keys of the unmasked loop are seen by every row
            assert rows[:, un_lo:un_hi].all()
            if not full_blocks:
                assert un_lo == un_hi


@settings(max_examples=300, deadline=None)
@given(lay=layouts())
def test_query_blocks_cover_skip_and_unmask_exactly(lay, dense_visibility):
    vis = dense_visibility(lay["pos"], lay["k_len"], left_padding=lay["left"], **_rule(lay))
    is_sorted = bool((lay["pos"][1:] >= lay["pos"][:-1]).all())
    bounds = query_blocks(
        lay["positions"], is_sorted, lay["q_len"], lay["k_len"], **_rule(lay),
        chunk_start=lay["left"], block_m=lay["block_m"], block_n=lay["block_n"],
        device=torch.device("cpu"),
    )  # fmt: skip
    bm, bn, q_len = lay["block_m"], lay["block_n"], lay["q_len"]
    n_rows = max(bounds.shape[0], vis.shape[0])  # unsorted positions: one row of bounds
    bounds, vis = bounds.expand(n_rows, -1, -1), vis.expand(n_rows, -1, -1)
    for b in range(bounds.shape[0]):
        for n in range(bounds.shape[1]):
            lo, un_lo, un_hi, hi = bounds[b, n].tolist()
            cols = vis[b, :, n * bn : (n + 1) * bn]  # [q_len, keys of the block]
            assert lo <= un_lo <= un_hi <= hi and un_hi <= q_len // bm * bm
            assert lo % bm == 0 and un_lo % bm == 0 and un_hi % bm == 0
            assert cols[un_lo:un_hi].all()
            rows = cols.any(1).nonzero().flatten()
            if not is_sorted:
                assert (lo, un_lo, un_hi, hi) == (0, 0, 0, q_len)
            elif rows.numel():
                assert lo == rows.min() // bm * bm and hi == rows.max() + 1
            else:
                assert hi == lo


def _bounds(length, *, window=None, chunk=None, causal=True):
    kw = dict(causal=causal, window=window, chunk=chunk, chunk_start=None, block_m=32,
              block_n=32, device=torch.device("cpu"))  # fmt: skip
    return (
        key_blocks(None, length, length, full_blocks=True, **kw),
        query_blocks(None, True, length, length, **kw),
    )


def test_sliding_window_visits_l_times_w_blocks():
    # L = 1024 in blocks of 32: causal attention visits 32·33/2 = 528 key blocks; a 64-key
    # window 1 + 2 + 3·30 = 93 (two window blocks and the diagonal one per query block)
    keys, queries = _bounds(1024)
    assert visited_blocks(keys, 32).sum() == 528 and visited_blocks(queries, 32).sum() == 528
    keys, queries = _bounds(1024, window=64)
    assert visited_blocks(keys, 32).sum() == 93 and visited_blocks(queries, 32).sum() == 93
    # the blocks every row sees in full need no mask: one per query block from the second on
    assert ((keys[0, :, 2] - keys[0, :, 1]) // 32).tolist() == [0] + [1] * 31
    # bidirectional: 2W - 1 keys around each query, 32 + 2·63 around a query block
    keys, _ = _bounds(1024, window=64, causal=False)
    assert visited_blocks(keys, 32).max() == 5
    # chunks of 128 keys: each query block reaches back to its chunk's start at most
    keys, queries = _bounds(1024, chunk=128)
    assert visited_blocks(keys, 32).sum() == 8 * (1 + 2 + 3 + 4)
    assert visited_blocks(queries, 32).sum() == 8 * (1 + 2 + 3 + 4)


@pytest.mark.parametrize("window", [None, 16])
def test_default_bounds_are_cached(window):
    first, _ = _bounds(256, window=window)
    again, _ = _bounds(256, window=window)
    assert first is again
