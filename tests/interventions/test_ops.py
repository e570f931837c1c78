"""Each pattern kind in both forms: on a materialised pattern and in closed form on q, k, v."""

import pytest
import torch

from interventions import ops
from interventions.specs import (
    FirstTokenAttention,
    PatchPattern,
    Redistribute,
    UniformAttention,
)

HEAD = [(0, 0)]


def _qkv(seed: int, rows=2, heads=3, n=10, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(rows, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, 0] *= 0  # key 0 gets score 0 and a large share, like a sink
    q = q * 2
    return q, k, v


def _pattern(q, k, causal):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = q.shape[2]
    if causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


SPECS = [
    UniformAttention(heads=HEAD),
    FirstTokenAttention(heads=HEAD),
    Redistribute(heads=HEAD, sinks=[0], beta=0.4),
    Redistribute(heads=HEAD, sinks=[0, 2, -1], beta=0.0),
    Redistribute(heads=HEAD, sinks=[0], beta=0.5, receivers=[[3, 6]]),
    Redistribute(heads=HEAD, threshold=0.15, exclude_first=False, beta=0.4),
    Redistribute(heads=HEAD, threshold=0.15, beta=0.4, receivers=[[1, 4], [7, 9]]),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("spec", SPECS, ids=[s.describe() for s in SPECS])
def test_closed_form_matches_pattern(spec, causal):
    q, k, v = _qkv(0)
    scale = q.shape[-1] ** -0.5
    expected = ops.new_pattern(spec, _pattern(q, k, causal), causal=causal) @ v
    got = ops.new_attention_output(spec, q, k, v, causal=causal, scale=scale)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


def test_patch_pattern_closed_form():
    q, k, v = _qkv(0)
    q_ref, k_ref, _ = _qkv(1)
    expected = _pattern(q_ref, k_ref, True) @ v
    spec = PatchPattern(heads=HEAD)
    got = ops.new_attention_output(spec, q, k, v, causal=True, scale=8**-0.5,
                                   source_qk=(q_ref, k_ref))  # fmt: skip
    torch.testing.assert_close(got, expected)
    assert torch.equal(ops.new_pattern(spec, _pattern(q, k, True), causal=True,
                                       source=_pattern(q_ref, k_ref, True)),
                       _pattern(q_ref, k_ref, True))  # fmt: skip


def test_redistribute_rule():
    """ACT: sink attention × beta, freed mass to the others in proportion; rows still sum to 1."""
    q, k, _ = _qkv(2)
    a = _pattern(q, k, True)
    new = ops.new_pattern(Redistribute(heads=HEAD, sinks=[0], beta=0.4), a, causal=True)
    torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)))
    rows = slice(1, None)  # row 0 sees only the sink: left as it is
    torch.testing.assert_close(new[..., rows, 0], 0.4 * a[..., rows, 0])
    others = new[..., rows, 1:] / a[..., rows, 1:].clamp(min=1e-300)
    visible = torch.ones(10, 10, dtype=torch.bool).tril()[rows, 1:]
    ratio = others[..., visible]  # the same factor on every receiving key of a row
    per_row = (1 - 0.4 * a[..., rows, 0]) / (1 - a[..., rows, 0])
    expected = per_row[..., None].expand(*per_row.shape, 9)[..., visible]
    torch.testing.assert_close(ratio, expected)
    torch.testing.assert_close(new[..., 0, :], a[..., 0, :])


def test_receivers_only_gain():
    q, k, _ = _qkv(3)
    a = _pattern(q, k, False)
    spec = Redistribute(heads=HEAD, sinks=[0], beta=0.5, receivers=[[3, 6]])
    new = ops.new_pattern(spec, a, causal=False)
    outside = [1, 2, 6, 7, 8, 9]
    torch.testing.assert_close(new[..., outside], a[..., outside])
    torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)))
    assert bool((new[..., 3:6] > a[..., 3:6]).all())


def test_threshold_finds_hidden_sinks():
    """ACT's rule Σ_i A[i, k] / (N − k) > threshold, the first token left out."""
    a = torch.full((1, 1, 4, 4), 0.0, dtype=torch.float64)
    a[0, 0] = torch.tensor(
        [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.7, 0.1, 0], [0.1, 0.6, 0.1, 0.2]]
    )
    spec = Redistribute(heads=HEAD, threshold=0.5, beta=0.4)
    mask = ops.sink_mask(spec, a.sum(-2), 4, causal=True)
    assert mask[0, 0].tolist() == [False, True, False, False]  # key 1: 1.8 / 3 = 0.6


def test_uniform_rows():
    q, k, _ = _qkv(4)
    new = ops.new_pattern(UniformAttention(heads=HEAD), _pattern(q, k, True), causal=True)
    assert torch.allclose(new[0, 0, 3, :4], torch.full((4,), 0.25, dtype=torch.float64))
    assert bool((new[0, 0, 3, 4:] == 0).all())
