"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported anywhere in the process; this file
sets it when pytest collects tests/kernels, which is early enough unless another conftest or an
earlier-collected test module already imported triton (then the root conftest must set it).
It also holds the independent dense computation the references are tested against.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch


@pytest.fixture
def interpreter() -> None:
    """Skip unless the kernels run under Triton's CPU interpreter."""
    pytest.importorskip("triton")
    from kernels.attention_stats import interpreting

    if not interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")


def _dense_visibility(pos, k_len, *, causal, window=None, chunk=None, left_padding=None):
    """[batch or 1, q_len, k_len] bool: which keys queries at positions ``pos`` may see before
    padding, in transformers' mask-function form (``kv_idx <= q_idx``, ``kv_idx > q_idx - W``,
    bidirectional ``|q_idx - kv_idx| <= W - 1``, ``(kv - lp) // C == (q - lp) // C``)."""
    i = pos.long()[None, :, None]  # [1, q_len, 1]
    j = torch.arange(k_len)[None, None, :]  # [1, 1, k_len]
    allowed = torch.ones(1, pos.shape[0], k_len, dtype=torch.bool)
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        allowed = allowed & ((j > i - window) if causal else ((i - j).abs() <= window - 1))
    if chunk is not None:
        lp = torch.zeros(1, dtype=torch.long) if left_padding is None else left_padding.long()
        lp = lp[:, None, None]
        allowed = allowed & ((j - lp) // chunk == (i - lp) // chunk)
    return allowed


def _naive_attention(
    q,
    k,
    v,
    *,
    causal=True,
    window=None,
    chunk=None,
    softcap=None,
    sinks=None,
    alibi_slopes=None,
    key_padding_mask=None,
    q_positions=None,
    sink_size=1,
    recent_window=None,
    spans=(),
    query_mask=None,
):
    """Every statistic from one materialised fp64 softmax, written independently of
    `kernels.reference`: the full logit matrix, the masks of `_dense_visibility`, and the
    learned sink as an extra logit column that is dropped after the softmax (gpt-oss's eager
    attention)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    batch, n_heads, q_len, d = q.shape
    k_len = k.shape[2]
    pos = torch.arange(k_len - q_len, k_len) if q_positions is None else q_positions.long()
    s = q @ k.transpose(-1, -2) / math.sqrt(d)  # [batch, heads, q_len, k_len]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        s = s + alibi_slopes.double()[:, None, None] * (torch.arange(k_len) - pos[:, None])
    left = None
    if key_padding_mask is not None:
        left = (key_padding_mask.long().cumsum(-1) == 0).sum(-1)  # leading padding per row
    allowed = _dense_visibility(
        pos, k_len, causal=causal, window=window, chunk=chunk, left_padding=left
    )[:, None]  # [batch or 1, 1, q_len, k_len]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, -math.inf)
    col = torch.full((batch, n_heads, q_len, 1), -math.inf, dtype=torch.float64)
    if sinks is not None:
        col = sinks.double()[None, :, None, None].expand(batch, n_heads, q_len, 1)
    full = torch.cat([s, col], -1)
    lse = torch.logsumexp(full, -1)
    live = torch.isfinite(lse)[..., None]
    probs = torch.where(live, torch.exp(full - lse[..., None]), 0.0)
    p, pz = probs[..., :-1], probs[..., -1]
    alive = allowed.expand_as(p).any(-1)
    maxp, arg = p.max(-1)
    j = torch.arange(k_len)[None, :]
    out = {
        "p": p,
        "lse": lse,
        "entropy": -torch.where(probs > 0, probs * probs.log(), 0.0).sum(-1),
        "max_prob": maxp,
        "argmax": torch.where(alive, arg, -1),
        "sink_mass": p[..., :sink_size].sum(-1),
        "span_mass": torch.stack([p[..., a:b].sum(-1) for a, b in spans], -1) if spans else None,
        "outside_mass": None,
        "output": p @ v,
        "learned_sink_mass": pz if sinks is not None else None,
    }
    if recent_window is not None:
        outside = (j >= sink_size) & (j <= pos[:, None] - recent_window)
        out["outside_mass"] = (p * outside).sum(-1)
    qm = torch.ones(batch, q_len) if query_mask is None else query_mask.double()
    out["received"] = (p * qm[:, None, :, None]).sum(2)
    return out


@pytest.fixture(scope="session")
def naive_attention():
    """The independent dense computation: ``naive_attention(q, k, v, **kw) -> dict``."""
    return _naive_attention


@pytest.fixture(scope="session")
def dense_visibility():
    """The independent positional mask: ``dense_visibility(pos, k_len, **kw) -> bool tensor``."""
    return _dense_visibility
