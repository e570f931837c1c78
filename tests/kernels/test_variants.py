"""Attention variants in the torch reference: sliding window, chunks, softcap, learned sinks,
ALiBi and d_v != d_qk, against the independent dense softmax of conftest, against transformers'
own mask functions and eager attention functions, and the argument checks (property-based)."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention_stats, reference, stats_from_pattern
from kernels.reference import AttentionStats

# every float statistic (argmax is compared on its own)
FIELDS = tuple(f.name for f in dataclasses.fields(AttentionStats) if f.name != "argmax")
SINKS = torch.tensor([0.5, -1.0, 2.0, 0.0])  # one learned sink logit per query head
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])  # BLOOM's slopes for 8 heads, first half
VARIANTS = {
    "window": dict(window=6),
    "window-bidirectional": dict(window=6, causal=False),
    "window-1": dict(window=1),  # only the query's own key
    "chunk": dict(chunk=8),
    "chunk-bidirectional": dict(chunk=8, causal=False),
    "softcap": dict(softcap=1.5),
    "sinks": dict(sinks=SINKS),
    "alibi": dict(alibi_slopes=SLOPES),
    "alibi-bidirectional": dict(alibi_slopes=SLOPES, causal=False),
    "d_v": dict(d_v=24),
    "everything": dict(window=9, chunk=12, softcap=2.0, sinks=SINKS, alibi_slopes=SLOPES, d_v=8),
}
SUBSET = torch.tensor([36, 3, 20, 4, 0, 35, 10])  # query positions: a subset, unsorted


def inputs(batch=2, n_heads=4, n_kv=2, q_len=37, k_len=37, d=16, d_v=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, n_heads, q_len, d, generator=g, dtype=dtype)
    k = torch.randn(batch, n_kv, k_len, d, generator=g, dtype=dtype)
    v = torch.randn(batch, n_kv, k_len, d_v or d, generator=g, dtype=dtype)
    pad = torch.ones(batch, k_len, dtype=torch.bool)
    pad[0, :5] = False  # left padding: fully masked causal rows, chunks shifted by 5
    pad[-1, k_len - 4 :] = False
    return q, k, v, pad


@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_matches_dense_softmax(name, subset, naive_attention):
    kw = dict(VARIANTS[name])
    q, k, v, pad = inputs(q_len=len(SUBSET) if subset else 37, d_v=kw.pop("d_v", None))
    spans = [[0, 3], [10, 25], [30, 37]]
    common = dict(key_padding_mask=pad, q_positions=SUBSET if subset else None, **kw)
    want = naive_attention(q, k, v, sink_size=2, recent_window=4, spans=spans, **common)
    got = reference.attention_stats(
        q, k, v, sink_size=2, recent_window=4, spans=spans, return_output=True, chunk_size=8,
        **common,
    )  # fmt: skip
    for field in FIELDS:
        x, y = getattr(got, field), want[field]
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10, msg=field)
    assert torch.equal(got.argmax, want["argmax"])

    qmask = torch.rand(2, q.shape[2], generator=torch.Generator().manual_seed(1)) < 0.5
    received = reference.received_attention(q, k, got.lse, query_mask=qmask, chunk_size=8, **common)
    wanted = naive_attention(q, k, v, query_mask=qmask, **common)["received"]
    torch.testing.assert_close(received, wanted, atol=1e-10, rtol=1e-10)


def test_received_and_learned_sink_share_every_row():
    # with learned sinks every row is live (the sink is always visible): the keys' column sums
    # plus the rows' sink masses count the rows, fully masked ones included
    q, k, _, pad = inputs()
    st_ = reference.attention_stats(q, k, key_padding_mask=pad, sinks=SINKS, window=5)
    recv = reference.received_attention(q, k, st_.lse, key_padding_mask=pad, window=5,
                                        sinks=SINKS)  # fmt: skip
    total = recv.sum(-1) + st_.learned_sink_mass.sum(-1)  # [batch, n_heads]
    torch.testing.assert_close(total, torch.full_like(total, 37.0))
    # the left-padding queries of row 0 see no key: everything on the sink
    assert (st_.learned_sink_mass[0, :, :5] == 1).all()
    assert (st_.argmax[0, :, :5] == -1).all() and (st_.entropy[0, :, :5] == 0).all()
    torch.testing.assert_close(st_.lse[0, :, :5], SINKS.double()[:, None].expand(4, 5))


@pytest.mark.parametrize("causal", [True, False])
def test_key_range_is_transformers_mask_functions(causal):
    """`reference.key_range` equals transformers' index-based mask functions, off-by-one
    conventions included: the attention function's ``sliding_window`` W is the causal overlay's
    argument and the bidirectional overlay's plus one (ModernBERT)."""
    masking = pytest.importorskip("transformers.masking_utils")
    pad = torch.ones(2, 30, dtype=torch.bool)
    pad[1, :7] = False
    left = (pad.cumsum(-1) == 0).sum(-1)  # transformers' left_padding_tokens
    b = torch.arange(2)[:, None, None]
    qi = torch.arange(30)[None, :, None]
    kv = torch.arange(30)[None, None, :]
    for window in (1, 2, 5, 31):
        if causal:
            fn = masking.sliding_window_causal_mask_function(window)
        else:
            fn = masking.sliding_window_bidirectional_mask_function(window - 1)
        first, end = reference.key_range(torch.arange(30), 30, causal=causal, window=window)
        ours = (kv >= first[..., None]) & (kv < end[..., None])
        assert torch.equal(ours.expand(2, -1, -1), fn(b, 0, qi, kv).expand(2, -1, -1)), window
    for chunk in (1, 4, 7):
        fn = masking.and_masks(
            masking.chunked_overlay(chunk, left),
            masking.causal_mask_function if causal else masking.bidirectional_mask_function,
        )
        first, end = reference.key_range(
            torch.arange(30), 30, causal=causal, chunk=chunk, chunk_start=left
        )
        ours = (kv >= first[..., None]) & (kv < end[..., None])
        assert torch.equal(ours, fn(b, 0, qi, kv).expand(2, -1, -1)), chunk


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A bool [batch, 1, q, k] mask in the additive form Hugging Face eager attention takes."""
    zeros = torch.zeros(allowed.shape, dtype=torch.float64)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float64).min)


def test_gpt_oss_eager_attention_with_sinks_and_window(dense_visibility):
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    q, k, v, pad = inputs()
    allowed = dense_visibility(torch.arange(37), 37, causal=True, window=6) & pad[:, None, :]
    module = SimpleNamespace(num_key_value_groups=2, sinks=SINKS.double(), training=False)
    out, weights = gpt_oss.eager_attention_forward(
        module, q, k, v, additive_mask(allowed[:, None]), scaling=16**-0.5
    )  # out [batch, q, heads, d], weights [batch, heads, q, k] without the sink column
    got = reference.attention_stats(
        q, k, v, window=6, sinks=SINKS, key_padding_mask=pad, return_output=True
    )
    torch.testing.assert_close(got.output, out.transpose(1, 2), atol=1e-10, rtol=1e-10)
    from_pattern = stats_from_pattern(
        weights, learned_sinks=True, window=6, causal=True, key_padding_mask=pad
    )
    for field in ("entropy", "max_prob", "sink_mass", "learned_sink_mass"):
        torch.testing.assert_close(
            getattr(from_pattern, field), getattr(got, field), atol=1e-10, rtol=1e-10, msg=field
        )
    assert torch.equal(from_pattern.argmax, got.argmax)


def test_gemma2_eager_attention_softcap():
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    q, k, v, _ = inputs()
    q = q * 4  # logits beyond the cap
    allowed = torch.ones(37, 37, dtype=torch.bool).tril()[None, None]
    module = SimpleNamespace(num_key_value_groups=2, head_dim=16, training=False)
    out, weights = gemma2.eager_attention_forward(
        module, q, k, v, additive_mask(allowed), scaling=16**-0.5, softcap=3.0
    )
    got = reference.attention_stats(q, k, v, softcap=3.0, return_output=True)
    # gemma2's softmax runs in fp32
    torch.testing.assert_close(got.output, out.transpose(1, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        stats_from_pattern(weights, causal=True).entropy, got.entropy, atol=1e-6, rtol=1e-6
    )


def test_bloom_alibi_gives_the_same_probabilities_under_left_padding():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    q, k, v, pad = inputs()
    pad[-1] = True
    pad[1, :9] = False  # left padding only: BLOOM counts positions among real tokens
    bias = bloom.build_alibi_tensor(pad.long(), 4, torch.float64).view(2, 4, 1, 37)
    slopes = bloom._get_alibi_slopes(4, pad.device)
    group_k = k.repeat_interleave(2, 1)
    logits = bias + (q @ group_k.transpose(-1, -2)) * 16**-0.5
    allowed = torch.ones(37, 37, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    p = torch.softmax(logits + additive_mask(allowed), -1)
    got = reference.attention_stats(
        q, k, v, alibi_slopes=slopes, key_padding_mask=pad, return_output=True
    )
    live = allowed.any(-1).expand(2, 4, 37)  # BLOOM spreads dead rows uniformly
    want_out = p @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(got.output[live], want_out[live], atol=1e-10, rtol=1e-10)
    want = stats_from_pattern(p, key_padding_mask=pad, causal=True)
    for field in ("entropy", "max_prob", "sink_mass"):
        torch.testing.assert_close(
            getattr(got, field), getattr(want, field), atol=1e-10, rtol=1e-10, msg=field
        )


def test_stats_from_pattern_with_learned_sinks_window_and_chunk(naive_attention):
    q, k, v, pad = inputs(dtype=torch.float32)
    kw = dict(window=7, chunk=10, key_padding_mask=pad, sinks=SINKS)
    want = naive_attention(q, k, v, sink_size=3, recent_window=2, spans=[[4, 20]], **kw)
    pattern = want["p"].float()
    # a fully masked row of an eager model without sinks spreads uniformly: the masks hide it
    pattern[0, :, :5] = 1 / 37
    got = stats_from_pattern(
        pattern, sink_size=3, recent_window=2, spans=[[4, 20]], causal=True, window=7,
        chunk=10, key_padding_mask=pad, learned_sinks=True,
    )  # fmt: skip
    want["learned_sink_mass"][0, :, :5] = 1  # no visible key: all on the sink
    want["entropy"][0, :, :5] = 0
    for field in ("entropy", "max_prob", "sink_mass", "span_mass", "outside_mass"):
        torch.testing.assert_close(
            getattr(got, field).double(), want[field], atol=2e-6, rtol=2e-6, msg=field
        )
    torch.testing.assert_close(
        got.learned_sink_mass.double(), want["learned_sink_mass"], atol=2e-6, rtol=0
    )
    assert torch.equal(got.argmax, want["argmax"])


def test_empty_query_with_sinks():
    q, k, v, _ = inputs(batch=1, q_len=0, k_len=5, dtype=torch.float32)
    st_ = reference.attention_stats(q, k, v, sinks=SINKS, window=2, return_output=True)
    assert st_.learned_sink_mass.shape == (1, 4, 0)


# ---------------------------------------------------------------------------------------------
# Argument checks: a property over arbitrary values, and the messages.

N_HEADS = 4
counts = st.one_of(
    st.none(),
    st.integers(-3, 6),
    st.integers(1, 6).map(np.int64),
    st.booleans(),
    st.floats(-2, 6),
    st.just("4"),
)
caps = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-2, 40),
    st.booleans(),
    st.just("30"),
)
per_head = st.one_of(
    st.none(),
    st.builds(
        lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
        st.sampled_from([(N_HEADS,), (N_HEADS - 1,), (1, N_HEADS), (), (N_HEADS, 1)]),
        st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
        st.sampled_from([0.5, -3.0, math.nan, math.inf, -math.inf]),
    ),
    st.just([0.5] * N_HEADS),  # a list, not a tensor
)


def _count_ok(x) -> bool:
    return x is None or (isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1)


def _cap_ok(x) -> bool:
    number = isinstance(x, (int, float)) and not isinstance(x, bool)
    return x is None or (number and math.isfinite(x) and x > 0)


def _per_head_ok(t) -> bool:
    if t is None:
        return True
    if not isinstance(t, torch.Tensor) or t.shape != (N_HEADS,) or not t.is_floating_point():
        return False
    return bool(torch.isfinite(t).all())


@settings(max_examples=300, deadline=None)
@given(window=counts, chunk=counts, softcap=caps, sinks=per_head, alibi_slopes=per_head)
def test_argument_validation_property(window, chunk, softcap, sinks, alibi_slopes):
    q = torch.randn(1, N_HEADS, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    kw = dict(window=window, chunk=chunk, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    checks = dict(
        window=_count_ok(window),
        chunk=_count_ok(chunk),
        softcap=_cap_ok(softcap),
        sinks=_per_head_ok(sinks),
        alibi_slopes=_per_head_ok(alibi_slopes),
    )
    bad = [name for name, ok in checks.items() if not ok]
    if not bad:
        st_ = attention_stats(q, k, backend="torch", **kw)
        assert torch.isfinite(st_.entropy).all()
        assert (st_.learned_sink_mass is None) == (sinks is None)
        return
    with pytest.raises(ValueError) as err:
        attention_stats(q, k, backend="torch", **kw)
    message = str(err.value)
    assert any(message.startswith(name + " must") for name in bad), message


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(window=0), r"window must be a positive int or None, got 0"),
        (dict(chunk=True), r"chunk must be a positive int or None, got True"),
        (dict(softcap=-1.0), r"softcap must be a finite positive number"),
        (dict(sinks=torch.zeros(3)), r"sinks must be a float tensor \[n_heads=4\], got .* \(3,\)"),
        (dict(alibi_slopes=torch.zeros(1, 4)), r"alibi_slopes must be a float tensor \[n_heads"),
        (dict(sinks=torch.tensor([0.0, math.nan, 0.0, 0.0])), r"sinks must be finite"),
    ],
)
def test_argument_messages(kw, message):
    q, k, _, _ = inputs(batch=1, q_len=4, k_len=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        attention_stats(q, k, backend="torch", **kw)
    with pytest.raises(ValueError, match=message):
        reference.received_attention(q, k, torch.zeros(1, 4, 4), **kw)
    if "window" in kw or "chunk" in kw:
        with pytest.raises(ValueError, match=message):
            stats_from_pattern(torch.rand(1, 4, 4, 4), **kw)
