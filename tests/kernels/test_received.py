"""The Triton received-attention kernel (CPU interpreter) against the torch reference."""

import pytest
import torch

from kernels import attention_stats, received_attention

pytestmark = pytest.mark.usefixtures("interpreter")


def qk(batch, n_heads, n_kv, q_len, k_len, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, q_len, d, generator=g).to(dtype)
    k = torch.randn(batch, n_kv, k_len, d, generator=g).to(dtype)
    return q, k


def both(q, k, *, query_mask=None, atol=1e-5, **kw):
    lse = attention_stats(q, k, backend="torch", **kw).lse
    got = received_attention(q, k, lse, query_mask=query_mask, backend="triton", **kw)
    want = received_attention(q, k, lse, query_mask=query_mask, backend="torch", **kw)
    assert got.shape == (q.shape[0], q.shape[1], k.shape[2]) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=atol, rtol=1e-5)
    return got


@pytest.mark.parametrize(
    ("causal", "n_heads", "n_kv", "length"),
    [(True, 2, 2, 1), (True, 4, 2, 45), (False, 4, 1, 70), (True, 2, 1, 96)],
)
def test_matches_reference(causal, n_heads, n_kv, length):
    q, k = qk(2, n_heads, n_kv, length, length, 32)
    got = both(q, k, causal=causal)
    # every query row distributes exactly one unit of attention
    torch.testing.assert_close(got.sum(-1), torch.full_like(got[..., 0], length), rtol=1e-5, atol=0)


def test_padding_fully_masked_rows_and_query_mask():
    q, k = qk(3, 4, 2, 50, 50, 16, seed=1)
    pad = torch.ones(3, 50, dtype=torch.bool)
    pad[0, :7] = False
    pad[1, 41:] = False
    pad[2] = False
    qmask = torch.rand(3, 50, generator=torch.Generator().manual_seed(2)) < 0.3
    for causal in (True, False):
        got = both(q, k, causal=causal, key_padding_mask=pad, query_mask=qmask)
        assert (got[~pad[:, None].expand_as(got)] == 0).all()
        assert (got[2] == 0).all()


def test_query_subset_positions():
    q, k = qk(1, 4, 2, 7, 100, 32, seed=3)
    both(q, k)  # last 7 positions
    both(q, k, q_positions=torch.tensor([0, 1, 31, 32, 33, 64, 99]))
    both(q, k, q_positions=torch.tensor([99, 0, 50, 3, 3, 70, 20]))  # unsorted, repeated


def test_fp16_and_huge_logits():
    q, k = qk(1, 2, 2, 60, 60, 32, dtype=torch.float16, seed=4)
    both(q, k, atol=1e-3)
    # logits up to ~1e4: fp32 lse carries ~|lse|·2^-24 absolute error, so probabilities agree
    # to ~1e-3 relative between any two fp32 implementations
    q, k = qk(1, 2, 1, 40, 40, 16, seed=5)
    got = both(q * 25, k * 25, scale=1.0, atol=5e-3)
    torch.testing.assert_close(got.sum(-1), torch.full_like(got[..., 0], 40), rtol=1e-3, atol=0)


@pytest.mark.slow
def test_longer_sequence():
    q, k = qk(1, 2, 1, 500, 500, 64, seed=6)
    both(q, k, atol=1e-4)


def test_errors():
    q, k = qk(1, 2, 2, 8, 8, 16)
    lse = attention_stats(q, k).lse
    with pytest.raises(ValueError, match="lse must be"):
        received_attention(q, k, lse[:, :1])
    with pytest.raises(ValueError, match="query_mask"):
        received_attention(q, k, lse, query_mask=torch.ones(1, 8))


def test_kv_cache_layout_default_positions():
    # q_len < k_len without q_positions: rows sit at the last keys, derived inside the kernel;
    # several query and key blocks, so the in-kernel block ranges are exercised
    q, k = qk(2, 4, 2, 70, 150, 16, seed=6)
    both(q, k)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :20] = False
    both(q, k, key_padding_mask=pad, query_mask=torch.rand(2, 70) < 0.5)
