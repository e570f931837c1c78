"""The top keys per query: the torch reference against `torch.topk` of a materialised softmax
(the independent dense computation of conftest.py), and the Triton kernel (CPU interpreter)
against the reference, exactly in the key indices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention_stats, reference, top_keys
from kernels.top_keys import K_TOP_CHOICES

SINKS = torch.tensor([1.0, -2.0, 3.0, 0.0])
SLOPES = torch.tensor([0.2, 0.1, 0.05, 0.025])
L = 100  # four key blocks of 32 in the interpreter


def qk(q_len=L, k_len=L, *, d=32, batch=2, n_heads=4, n_kv=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, q_len, d, generator=g).to(dtype)
    k = torch.randn(batch, n_kv, k_len, d, generator=g).to(dtype)
    pad = torch.ones(batch, k_len, dtype=torch.bool)
    pad[0, :13] = False  # left padding: fully masked causal rows
    pad[-1, k_len - 9 :] = False
    return q, k, pad


def dense_top(p: torch.Tensor, k_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` of the materialised probabilities [..., k_len], padded as the definition
    says: keys with probability 0 (not visible) become index -1."""
    values, index = p.topk(min(k_top, p.shape[-1]), dim=-1)
    index = torch.where(values > 0, index, -1)
    missing = k_top - values.shape[-1]
    if missing:
        values = torch.cat([values, values.new_zeros(*values.shape[:-1], missing)], -1)
        index = torch.cat([index, index.new_full((*index.shape[:-1], missing), -1)], -1)
    return values, index


REFERENCE_CASES = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "window": dict(window=9),
    "window-bidirectional": dict(window=9, causal=False),
    "chunk": dict(chunk=16),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=SINKS),
    "alibi": dict(alibi_slopes=SLOPES),
    "query-subset": dict(q_positions=torch.tensor([60, 2, 33, 0, 59, 14])),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
@pytest.mark.parametrize("k_top", [1, 5, 70])
def test_reference_is_topk_of_the_materialised_softmax(name, k_top, naive_attention):
    kw = dict(REFERENCE_CASES[name])
    q_len = 6 if "q_positions" in kw else 61
    q, k, pad = qk(q_len, 61, d=16, dtype=torch.float64)
    v = torch.zeros_like(k)
    p = naive_attention(q, k, v, key_padding_mask=pad, **kw)["p"]  # [batch, heads, q, k]
    want_p, want_i = dense_top(p, k_top)
    got_p, got_i = reference.top_keys(
        q.float(), k.float(), k_top=k_top, key_padding_mask=pad, chunk_size=16, **kw
    )
    assert got_p.dtype == torch.float32 and got_i.dtype == torch.int64
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_p.double(), want_p, atol=1e-6, rtol=0)
    # the first column is the statistics' max_prob and argmax
    stats = attention_stats(q.float(), k.float(), key_padding_mask=pad, backend="torch", **kw)
    assert torch.equal(got_i[..., 0], stats.argmax)
    torch.testing.assert_close(got_p[..., 0], stats.max_prob, atol=1e-6, rtol=0)


def tied_inputs(q_len=L, k_len=L):
    """Small integers (d = 4, scale 1/2): every logit is an exact half-integer on every path,
    so many keys tie."""
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-2, 3, (2, 4, q_len, 4), generator=g).float()
    k = torch.randint(-1, 2, (2, 2, k_len, 4), generator=g).float()
    pad = torch.ones(2, k_len, dtype=torch.bool)
    pad[0, :5] = False
    return q, k, pad


def stable_top(p: torch.Tensor, k_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition's tie rule, independently: a stable descending sort of the probabilities
    keeps equal ones in key order."""
    values, index = p.sort(dim=-1, descending=True, stable=True)
    values, index = values[..., :k_top], index[..., :k_top]
    return values, torch.where(values > 0, index, -1)


@pytest.mark.parametrize("kw", [dict(), dict(window=20), dict(causal=False, chunk=24)])
def test_ties_go_to_the_smaller_key_index(kw, naive_attention):
    q, k, pad = tied_inputs(50, 50)
    p = naive_attention(q, k, torch.zeros_like(k), key_padding_mask=pad, **kw)["p"]
    want_p, want_i = stable_top(p, 8)
    got_p, got_i = reference.top_keys(q, k, k_top=8, key_padding_mask=pad, chunk_size=16, **kw)
    assert (want_p[..., :-1] == want_p[..., 1:]).any()  # the case has ties inside the top 8
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_p.double(), want_p, atol=1e-6, rtol=0)


@st.composite
def problems(draw):
    n_kv = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)),
        n_kv=n_kv,
        n_heads=n_kv * draw(st.integers(1, 2)),
        q_len=draw(st.integers(1, 24)),
        k_len=draw(st.integers(1, 40)),
        d=draw(st.sampled_from([4, 8])),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 12))),
        padding=draw(st.integers(0, 5)),
        k_top=draw(st.integers(1, 20)),
        chunk_size=draw(st.integers(1, 17)),
        seed=draw(st.integers(0, 2**16)),
    )


def _draw(pr):
    q_len = min(pr["q_len"], pr["k_len"])
    q, k, _ = qk(q_len, pr["k_len"], d=pr["d"], batch=pr["batch"], n_heads=pr["n_heads"],
                 n_kv=pr["n_kv"], dtype=torch.float64, seed=pr["seed"])  # fmt: skip
    pad = torch.ones(pr["batch"], pr["k_len"], dtype=torch.bool)
    pad[0, : pr["padding"]] = False
    kw = dict(causal=pr["causal"], window=pr["window"], key_padding_mask=pad)
    return q, k, kw


@settings(max_examples=150, deadline=None)
@given(pr=problems())
def test_reference_on_any_shape(pr, naive_attention):
    """Any shape, k_top and chunking: the probabilities are the k_top largest of the dense
    softmax, largest first, each at a distinct visible key that has it; the rest is padding."""
    q, k, kw = _draw(pr)
    p = naive_attention(q, k, torch.zeros_like(k), **kw)["p"]
    probs, index = reference.top_keys(q, k, k_top=pr["k_top"], chunk_size=pr["chunk_size"], **kw)
    assert probs.shape == index.shape == (*q.shape[:3], pr["k_top"])
    want, _ = dense_top(p, pr["k_top"])  # the values only: ties may sit at any key
    torch.testing.assert_close(probs, want, atol=1e-12, rtol=0)
    live = index >= 0
    assert torch.equal(live, probs > 0)
    torch.testing.assert_close(p.gather(-1, index.clamp(min=0))[live], probs[live], atol=1e-12,
                               rtol=0)  # fmt: skip
    assert (probs[..., :-1] >= probs[..., 1:]).all()
    visible = (p > 0).sum(-1, keepdim=True)
    assert torch.equal(live.sum(-1, keepdim=True), visible.clamp(max=pr["k_top"]))
    keys = torch.where(live, index, -1 - torch.arange(pr["k_top"]))  # padding made distinct
    assert (keys.sort(-1).values.diff(dim=-1) != 0).all()


def test_given_lse_is_the_one_computed():
    q, k, pad = qk(40, 40, d=16)
    kw = dict(key_padding_mask=pad, window=12, sinks=SINKS)
    lse = attention_stats(q, k, backend="torch", **kw).lse
    computed = reference.top_keys(q, k, k_top=4, **kw)
    given_ = reference.top_keys(q, k, lse, k_top=4, **kw)
    assert torch.equal(computed[1], given_[1])
    torch.testing.assert_close(computed[0], given_[0], atol=1e-7, rtol=0)
    # with learned sinks the probabilities are the softmax's own: the sink takes a share
    public = top_keys(q, k, k_top=4, backend="torch", **kw)
    assert torch.equal(public[1], given_[1])


@pytest.mark.parametrize("bad", [0, 3, 32, -1, True, 2.0, "4", None])
def test_k_top_must_be_a_small_power_of_two(bad):
    q, k, _ = qk(4, 4, d=16)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="k_top must be a power of two up to 16"):
            top_keys(q, k, k_top=bad, backend=backend)
    if bad not in (3, 32, "4", None):  # the reference takes any integer >= 1
        with pytest.raises(ValueError, match="k_top must be an integer >= 1"):
            reference.top_keys(q, k, k_top=bad)


def test_lse_of_the_wrong_shape_is_refused():
    q, k, _ = qk(8, 8, d=16)
    with pytest.raises(ValueError, match="lse must be"):
        top_keys(q, k, torch.zeros(2, 4, 7), k_top=2)


def test_no_queries():
    q, k, _ = qk(0, 5, d=16)
    for backend in ("torch", "triton"):
        probs, index = top_keys(q, k, k_top=2, backend=backend)
        assert probs.shape == index.shape == (2, 4, 0, 2)


# ---------------------------------------------------------------------------------------------
# The Triton kernel (CPU interpreter) against the reference.

KERNEL_CASES = {
    "causal": (dict(), 4),
    "bidirectional-window": (dict(causal=False, window=30), 8),
    "chunk": (dict(chunk=48), 16),
    "softcap-sinks-alibi": (dict(softcap=2.0, sinks=SINKS, alibi_slopes=SLOPES), 2),
    "unsorted-subset": (dict(q_positions=torch.tensor([99, 2, 60, 33, 0, 70, 40])), 4),
    "one": (dict(window=40), 1),
}


def both(q, k, k_top, **kw):
    lse = attention_stats(q, k, backend="torch", **kw).lse
    got = top_keys(q, k, lse, k_top=k_top, backend="triton", **kw)
    want = top_keys(q, k, lse, k_top=k_top, backend="torch", **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    return got


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_reference(name):
    kw, k_top = KERNEL_CASES[name]
    q_len = len(kw["q_positions"]) if "q_positions" in kw else L
    q, k, pad = qk(q_len, L)
    _, index = both(q, k, k_top, key_padding_mask=pad, **kw)
    positions = kw.get("q_positions", torch.arange(L))
    if kw.get("causal", True):  # a query in the left padding sees no key
        assert (index[0][:, positions < 13] == -1).all()


@pytest.mark.usefixtures("interpreter")
def test_kernel_fp16():
    q, k, pad = qk(dtype=torch.float16)
    both(q, k, 4, key_padding_mask=pad, window=50)


@pytest.mark.usefixtures("interpreter")
def test_kernel_ties_go_to_the_smaller_key_index():
    q, k, pad = tied_inputs()
    probs, _ = both(q, k, 16, key_padding_mask=pad)
    assert ((probs[..., :-1] == probs[..., 1:]) & (probs[..., 1:] > 0)).any()  # ties in the top


@pytest.mark.usefixtures("interpreter")
def test_kernel_never_reads_skipped_key_blocks():
    """NaN keys in every block no query's window reaches leave the result unchanged: the loop
    bounds of `kernels.blocks` skip them."""
    q, k, _ = qk(20, 300, seed=4)
    want = top_keys(q, k, k_top=4, window=32, backend="torch")
    k[:, :, :224] = math.nan  # rows at keys 280..299 see keys 249..299; blocks of 32 from 224
    got = top_keys(q, k, attention_stats(q, k, window=32, backend="torch").lse, k_top=4,
                   window=32, backend="triton")  # fmt: skip
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)


@pytest.mark.usefixtures("interpreter")
@settings(max_examples=8, deadline=None)
@given(pr=problems(), k_top=st.sampled_from(K_TOP_CHOICES))
def test_kernel_on_any_shape(pr, k_top):
    q, k, kw = _draw(pr)
    both(q.float(), k.float(), k_top, **kw)
