"""The Triton kernels (CPU interpreter) on the attention variants, against the torch reference:
sliding window, chunks, softcap, learned sinks, ALiBi, d_v != d_qk, each mixed with GQA,
padding, query subsets, spans, sinks and the recent window; and proof that skipped key blocks
are never read."""

import dataclasses
import math

import pytest
import torch

from kernels import attention_stats, received_attention
from kernels.reference import AttentionStats

pytestmark = pytest.mark.usefixtures("interpreter")

# every float statistic (argmax is compared on its own)
FIELDS = tuple(f.name for f in dataclasses.fields(AttentionStats) if f.name != "argmax")
SINKS = torch.tensor([1.0, -2.0, 3.0, 0.0])
SLOPES = torch.tensor([0.2, 0.1, 0.05, 0.025])
L = 150  # about five blocks of 32 in the interpreter
CASES = {
    "window": dict(window=40),
    "window-bidirectional": dict(window=40, causal=False),
    "chunk": dict(chunk=48),
    "chunk-bidirectional": dict(chunk=48, causal=False),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=SINKS),
    "alibi": dict(alibi_slopes=SLOPES),
    "alibi-bidirectional": dict(alibi_slopes=SLOPES, causal=False),
    "d_v": dict(d=24, d_v=40),
    "everything": dict(window=50, chunk=64, softcap=3.0, sinks=SINKS, alibi_slopes=SLOPES, d_v=16),
}


def qkv(q_len=L, k_len=L, d=32, d_v=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, d, generator=g).to(dtype)
    k = torch.randn(2, 2, k_len, d, generator=g).to(dtype)
    v = torch.randn(2, 2, k_len, d_v or d, generator=g).to(dtype)
    pad = torch.ones(2, k_len, dtype=torch.bool)
    pad[0, :13] = False  # left padding (fully masked rows, shifted chunks)
    pad[1, k_len - 9 :] = False
    return q, k, v, pad


def assert_close(got, want, p, *, atol, rtol):
    """Every field close; argmax equal, or at two keys with the same probability (``p``: the
    dense pattern [batch, heads, q, k])."""
    for name in FIELDS:
        x, y = getattr(got, name), getattr(want, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        assert x.shape == y.shape and not torch.isnan(x).any(), name
        torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=rtol, msg=name)
    differ = got.argmax != want.argmax
    if differ.any():
        at = lambda idx: p.gather(-1, idx.clamp(min=0)[..., None])[..., 0]  # noqa: E731
        assert (got.argmax[differ] >= 0).all() and (want.argmax[differ] >= 0).all()
        torch.testing.assert_close(at(got.argmax)[differ], at(want.argmax)[differ], atol=1e-4,
                                   rtol=1e-3)  # fmt: skip


def run_case(kw, naive_attention, *, q_positions=None, q_len=L, k_len=L, dtype=torch.float32,
             atol=1e-5, rtol=1e-5):  # fmt: skip
    kw = dict(kw)
    q, k, v, pad = qkv(q_len, k_len, d=kw.pop("d", 32), d_v=kw.pop("d_v", None), dtype=dtype)
    common = dict(key_padding_mask=pad, q_positions=q_positions, **kw)
    stats_kw = dict(sink_size=3, recent_window=9, spans=[[2, 9], [60, 110]], return_output=True)
    got = attention_stats(q, k, v, backend="triton", **stats_kw, **common)
    want = attention_stats(q, k, v, backend="torch", **stats_kw, **common)
    p = naive_attention(q, k, v, **common)["p"]
    assert_close(got, want, p, atol=atol, rtol=rtol)

    qmask = torch.rand(2, q.shape[2], generator=torch.Generator().manual_seed(3)) < 0.6
    recv = received_attention(q, k, want.lse, query_mask=qmask, backend="triton", **common)
    recv_ref = received_attention(q, k, want.lse, query_mask=qmask, backend="torch", **common)
    torch.testing.assert_close(recv, recv_ref.float(), atol=atol * 10, rtol=rtol)
    return got


@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_reference(name, naive_attention):
    got = run_case(CASES[name], naive_attention)
    if "sinks" in CASES[name]:  # left-padding rows see no key: everything on the sink
        assert (got.learned_sink_mass[0, :, :13] == 1).all() and (got.entropy[0, :, :13] == 0).all()


@pytest.mark.parametrize(
    "q_positions",
    [
        torch.tensor([0, 5, 33, 34, 70, 90, 149]),  # sorted answer tokens
        torch.tensor([149, 2, 90, 33, 0, 70, 40]),  # unsorted
    ],
)
def test_variants_on_query_subsets(q_positions, naive_attention):
    run_case(CASES["everything"], naive_attention, q_positions=q_positions, q_len=7)
    run_case(CASES["window"], naive_attention, q_positions=q_positions, q_len=7)


def test_kv_cache_layout_with_window_and_chunk(naive_attention):
    # q_len < k_len with the default positions: the last 40 of 150 keys
    run_case(dict(window=30, chunk=64, sinks=SINKS), naive_attention, q_len=40)


@pytest.mark.parametrize("name", ["window", "softcap", "sinks", "d_v"])
def test_fp16(name, naive_attention):
    got = run_case(CASES[name], naive_attention, dtype=torch.float16, atol=2e-3, rtol=2e-3)
    assert got.output.dtype == torch.float16 and got.lse.dtype == torch.float32


def test_skipped_key_blocks_are_never_read():
    """NaN keys and values in every block that no query's window reaches leave all statistics
    and the output finite: the loops skip those blocks (a masked visit would still multiply a
    zero probability by a NaN value). The sink and span walks stay inside the window too."""
    q, k, v, _ = qkv(q_len=20, k_len=300, seed=4)
    clean = attention_stats(q, k, v, window=32, spans=[[0, 100], [270, 300]], sink_size=4,
                            recent_window=8, return_output=True, backend="torch")  # fmt: skip
    # rows at keys 280..299 see keys 249..299; their blocks of 32 start at 224
    k[:, :, :224], v[:, :, :224] = math.nan, math.nan
    got = attention_stats(q, k, v, window=32, spans=[[0, 100], [270, 300]], sink_size=4,
                          recent_window=8, return_output=True, backend="triton")  # fmt: skip
    for name in FIELDS:
        x, y = getattr(got, name), getattr(clean, name)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=name)
    assert (got.sink_mass == 0).all() and (got.span_mass[..., 0] == 0).all()


def test_triton_backend_validates_the_same_way():
    q, k, _, _ = qkv(q_len=4, k_len=4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        attention_stats(q, k, window=0, backend="triton")
    with pytest.raises(ValueError, match=r"sinks must be a float tensor \[n_heads=4\]"):
        attention_stats(q, k, sinks=torch.zeros(2), backend="triton")
    with pytest.raises(ValueError, match="softcap must be"):
        received_attention(q, k, torch.zeros(2, 4, 4), softcap=math.inf, backend="triton")
