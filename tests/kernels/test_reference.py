"""The torch references and `stats_from_pattern` against dense fp64 formulas."""

import math

import pytest
import torch

from kernels import AttentionStats, reference, stats_from_pattern


def dense(q, k, v, *, causal, sink, window, spans, q_pos, pad, query_mask=None):
    """Every statistic straight from the definitions, on the full fp64 pattern."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [batch, heads, q_len, k_len]
    j = torch.arange(k.shape[2])
    vis = torch.ones_like(s, dtype=torch.bool)
    if causal:
        vis &= j[None, :] <= q_pos[:, None]
    if pad is not None:
        vis &= pad[:, None, None, :]
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(vis, torch.exp(s - lse[..., None]), 0.0)
    alive = vis.any(-1)
    maxp, arg = p.max(-1)
    outside = (j[None, :] >= sink) & (j[None, :] <= q_pos[:, None] - window)
    qm = torch.ones(p.shape[0], p.shape[2]) if query_mask is None else query_mask.double()
    return {
        "p": p,
        "lse": lse,
        "entropy": -torch.where(p > 0, p * p.log(), 0.0).sum(-1),
        "max_prob": maxp,
        "argmax": torch.where(alive, arg, -1),
        "sink_mass": p[..., :sink].sum(-1),
        "outside_mass": (p * outside).sum(-1),
        "span_mass": torch.stack([p[..., a:b].sum(-1) for a, b in spans], -1),
        "output": p @ v,
        "received": (p * qm[:, None, :, None]).sum(2),
    }


def inputs(batch=2, n_heads=4, n_kv=2, q_len=37, k_len=37, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, q_len, d, generator=g, dtype=dtype)
    k = torch.randn(batch, n_kv, k_len, d, generator=g, dtype=dtype)
    v = torch.randn(batch, n_kv, k_len, d, generator=g, dtype=dtype)
    pad = torch.ones(batch, k_len, dtype=torch.bool)
    pad[0, :5] = False  # left padding: fully masked causal rows
    pad[-1, k_len - 4 :] = False
    return q, k, v, pad


CASES = [
    dict(causal=True, q_pos=None),
    dict(causal=False, q_pos=None),
    dict(causal=True, q_pos=torch.tensor([36, 3, 20, 4, 0, 35, 10])),  # a query subset
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_stats_reference(case, dtype):
    q_pos = case["q_pos"]
    q, k, v, pad = inputs(q_len=37 if q_pos is None else len(q_pos), dtype=dtype)
    spans = [[0, 3], [10, 25], [30, 37]]
    want = dense(
        q, k, v, causal=case["causal"], sink=2, window=6, spans=spans,
        q_pos=torch.arange(37) if q_pos is None else q_pos, pad=pad,
    )  # fmt: skip
    got = reference.attention_stats(
        q, k, v, causal=case["causal"], sink_size=2, recent_window=6, spans=spans,
        q_positions=q_pos, key_padding_mask=pad, return_output=True, chunk_size=8,
    )  # fmt: skip
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in ("lse", "entropy", "max_prob", "sink_mass", "outside_mass", "span_mass", "output"):
        x = getattr(got, name)
        assert x.dtype == (torch.float64 if dtype == torch.float64 else dtype), name
        torch.testing.assert_close(x.double(), want[name], atol=tol, rtol=tol, msg=name)
    assert torch.equal(got.argmax, want["argmax"])

    qmask = torch.rand(2, q.shape[2], generator=torch.Generator().manual_seed(1)) < 0.5
    received = reference.received_attention(
        q, k, got.lse, causal=case["causal"], q_positions=q_pos, key_padding_mask=pad,
        query_mask=qmask, chunk_size=8,
    )  # fmt: skip
    wanted = dense(
        q, k, v, causal=case["causal"], sink=2, window=6, spans=spans,
        q_pos=torch.arange(37) if q_pos is None else q_pos, pad=pad, query_mask=qmask,
    )["received"]  # fmt: skip
    torch.testing.assert_close(received.double(), wanted, atol=tol, rtol=tol)


def test_stats_from_pattern():
    q, k, v, pad = inputs(dtype=torch.float32)
    spans = [[0, 1], [5, 30]]
    want = dense(
        q, k, v, causal=True, sink=4, window=3, spans=spans, q_pos=torch.arange(37), pad=pad
    )
    pattern = want["p"].float()
    pattern[0, :, :5] = 1 / 37  # HF eager fills fully masked rows uniformly; padding hides them
    got = stats_from_pattern(
        pattern, sink_size=4, recent_window=3, spans=spans, key_padding_mask=pad, causal=True,
        chunk_size=16,
    )  # fmt: skip
    assert got.lse is None and got.output is None
    for name in ("entropy", "max_prob", "sink_mass", "outside_mass", "span_mass"):
        torch.testing.assert_close(getattr(got, name).double(), want[name], atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax, want["argmax"])


def test_stats_from_pattern_ties_take_the_smallest_key():
    pattern = torch.tensor([[[[0.25, 0.5, 0.0, 0.5 - 1e-9, 0.25]]]]).double()
    pattern[..., 3] = 0.5
    assert stats_from_pattern(pattern).argmax.item() == 1


def test_stats_container():
    q, k, v, _ = inputs(batch=1, q_len=5, k_len=5, dtype=torch.float32)
    st = reference.attention_stats(q, k, v, return_output=True, spans=[[0, 2]])
    assert isinstance(st, AttentionStats)
    half = st.apply(lambda t: t[:, :2])
    assert half.entropy.shape == (1, 2, 5) and half.outside_mass is None
    assert st.to("cpu").argmax.dtype == torch.int64
    text = repr(st)
    assert "entropy: (1, 4, 5) float32" in text and "outside_mass: None" in text


def test_empty_query():
    q, k, v, _ = inputs(batch=1, q_len=0, k_len=5, dtype=torch.float32)
    st = reference.attention_stats(q, k, v, return_output=True, recent_window=2)
    assert st.entropy.shape == (1, 4, 0) and st.output.shape == (1, 4, 0, 16)


def test_pattern_shape_error():
    with pytest.raises(ValueError, match="pattern must be"):
        stats_from_pattern(torch.rand(3, 4, 4))
