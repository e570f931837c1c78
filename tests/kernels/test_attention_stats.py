"""The Triton stats kernel (CPU interpreter) against the torch reference."""

import importlib

import pytest
import torch

from kernels import AttentionStats, attention_stats

attention_stats_module = importlib.import_module("kernels.attention_stats")

pytestmark = pytest.mark.usefixtures("interpreter")

FIELDS = ("lse", "entropy", "max_prob", "sink_mass", "span_mass", "outside_mass", "output")


def _score(q, k, scale, idx):
    """Score of every query row against key ``idx`` [batch, n_heads, q_len] (idx >= 0)."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)  # [batch, n_heads, k_len, d]
    key = torch.gather(kk, 2, idx.clamp(min=0)[..., None].expand(-1, -1, -1, k.shape[-1]))
    return (q.double() * key).sum(-1) * scale


def assert_stats_close(
    got: AttentionStats, want: AttentionStats, q, k, *, atol=1e-5, rtol=1e-5, tie_tol=1e-4
):
    for name in FIELDS:
        x, y = getattr(got, name), getattr(want, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        assert x.shape == y.shape, name
        assert not torch.isnan(x).any(), name
        torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=rtol, msg=name)
    assert got.argmax.dtype == torch.int64
    differ = got.argmax != want.argmax
    if differ.any():  # allowed only between keys whose scores tie within tie_tol
        scale = q.shape[-1] ** -0.5
        s_got = _score(q, k, scale, got.argmax)[differ]
        s_want = _score(q, k, scale, want.argmax)[differ]
        assert (got.argmax[differ] >= 0).all() and (want.argmax[differ] >= 0).all()
        assert torch.allclose(s_got, s_want, atol=tie_tol, rtol=tie_tol), (s_got, s_want)


def both(q, k, v=None, **kw):
    return attention_stats(q, k, v, backend="triton", **kw), attention_stats(
        q, k, v, backend="torch", **kw
    )


def qkv(batch, n_heads, n_kv, q_len, k_len, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, q_len, d, generator=g).to(dtype)
    k = torch.randn(batch, n_kv, k_len, d, generator=g).to(dtype)
    v = torch.randn(batch, n_kv, k_len, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    ("causal", "n_heads", "n_kv", "length", "d"),
    [
        (True, 2, 2, 1, 16),  # L = 1
        (True, 4, 2, 45, 32),  # GQA, L not a multiple of the block (32 in the interpreter)
        (False, 4, 1, 70, 32),  # bidirectional, multi-query
        (True, 3, 3, 96, 48),  # L a multiple of the block; d not a power of two
    ],
)
def test_matches_reference(causal, n_heads, n_kv, length, d):
    q, k, v = qkv(2, n_heads, n_kv, length, length, d)
    kw = dict(causal=causal, sink_size=2, recent_window=5, spans=[[3, 9], [20, 40]])
    got, want = both(q, k, v, return_output=True, **kw)
    assert_stats_close(got, want, q, k)


def test_defaults_and_shapes():
    q, k, _ = qkv(1, 2, 2, 33, 33, 16)
    got, want = both(q, k)
    assert got.span_mass is None and got.outside_mass is None and got.output is None
    assert got.lse.shape == (1, 2, 33) and got.lse.dtype == torch.float32
    assert_stats_close(got, want, q, k)


def test_padding_and_fully_masked_rows():
    q, k, v = qkv(3, 4, 2, 50, 50, 32, seed=1)
    pad = torch.ones(3, 50, dtype=torch.bool)
    pad[0, :7] = False  # left padding: the first 7 queries see nothing under the causal mask
    pad[1, 41:] = False  # right padding
    pad[2] = False  # nothing real at all
    kw = dict(sink_size=1, recent_window=4, spans=[[0, 10]], key_padding_mask=pad)
    got, want = both(q, k, v, return_output=True, **kw)
    assert_stats_close(got, want, q, k)
    dead = torch.zeros(3, 50, dtype=torch.bool)
    dead[0, :7] = True
    dead[2] = True
    dead = dead[:, None].expand(-1, 4, -1)
    assert torch.isneginf(got.lse[dead]).all() and torch.isfinite(got.lse[~dead]).all()
    assert (got.argmax[dead] == -1).all()
    for name in ("entropy", "max_prob", "sink_mass", "outside_mass"):
        assert (getattr(got, name)[dead] == 0).all(), name
    assert (got.span_mass[dead] == 0).all() and (got.output[dead] == 0).all()
    # padding keys are never the argmax
    assert (got.argmax[1] < 41).all() and (got.argmax[0][~dead[0]] >= 7).all()


def test_bidirectional_padding():
    q, k, v = qkv(2, 2, 2, 40, 40, 16, seed=2)
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, 30:] = False
    got, want = both(
        q, k, v, causal=False, key_padding_mask=pad, recent_window=3, return_output=True
    )
    assert_stats_close(got, want, q, k)


def test_query_subset_and_kv_cache_positions():
    q, k, v = qkv(2, 4, 2, 6, 90, 32, seed=3)
    kw = dict(sink_size=4, recent_window=8, spans=[[10, 20], [85, 90]], return_output=True)
    # default: the 6 queries are the last 6 positions (KV-cache convention)
    got, want = both(q, k, v, **kw)
    assert_stats_close(got, want, q, k)
    # answer tokens scattered over the prompt, sorted and unsorted
    for pos in ([0, 5, 33, 34, 70, 89], [70, 2, 89, 33, 0, 40]):
        got, want = both(q, k, v, q_positions=torch.tensor(pos), **kw)
        assert_stats_close(got, want, q, k)


def test_per_batch_spans():
    q, k, _ = qkv(2, 2, 1, 64, 64, 16, seed=4)
    spans = torch.tensor([[[0, 5], [30, 64]], [[10, 11], [63, 64]]])
    got, want = both(q, k, spans=spans, causal=False)
    assert got.span_mass.shape == (2, 2, 64, 2)
    assert_stats_close(got, want, q, k)


def test_huge_logits():
    q, k, v = qkv(1, 2, 1, 40, 40, 16, seed=5)
    got, want = both(q * 100, k * 100, v, scale=1.0, recent_window=2, return_output=True)
    assert torch.isfinite(got.lse).all() and got.lse.abs().max() > 1e4
    for name in ("entropy", "max_prob", "outside_mass", "sink_mass"):
        assert not torch.isnan(getattr(got, name)).any()
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-6, atol=0)
    got.lse = want.lse
    assert_stats_close(got, want, q * 100, k * 100, atol=1e-5)


def test_fp16_inputs():
    q, k, v = qkv(1, 4, 2, 70, 70, 32, dtype=torch.float16, seed=6)
    got, want = both(q, k, v, recent_window=6, spans=[[1, 4]], return_output=True)
    assert got.output.dtype == torch.float16 and got.lse.dtype == torch.float32
    assert_stats_close(got, want, q, k, atol=2e-3, rtol=2e-3, tie_tol=1e-2)


def test_ties_go_to_the_smallest_key_index():
    # integer q and constant k: every visible key has exactly the same score in any sum order
    q = torch.randint(-3, 4, (1, 2, 40, 16), generator=torch.Generator().manual_seed(7)).float()
    k = torch.ones(1, 1, 40, 16)
    pad = torch.ones(1, 40, dtype=torch.bool)
    pad[0, :3] = False
    for causal in (True, False):
        got = attention_stats(q, k, causal=causal, key_padding_mask=pad, backend="triton")
        live = got.argmax != -1
        assert (got.argmax[live] == 3).all()
        pos = torch.arange(40)
        visible = (pos + 1 - 3).clamp(min=0) if causal else torch.full((40,), 37)
        want = torch.where(visible > 0, 1.0 / visible.clamp(min=1).double(), 0.0)
        torch.testing.assert_close(got.max_prob[0, 0].double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_longer_sequence():
    q, k, v = qkv(1, 2, 1, 600, 600, 64, seed=8)
    got, want = both(q, k, v, recent_window=64, spans=[[100, 140]], return_output=True)
    assert_stats_close(got, want, q, k)


def test_auto_backend_on_cpu_is_the_reference():
    q, k, _ = qkv(1, 2, 2, 10, 10, 16)
    a = attention_stats(q, k)
    b = attention_stats(q, k, backend="torch")
    torch.testing.assert_close(a.entropy, b.entropy, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "message"),
    [
        ((2, 4, 8), (2, 2, 8, 16), "q must be"),
        ((2, 4, 8, 16), (2, 3, 8, 16), "multiple of n_kv_heads"),
        ((2, 4, 8, 16), (1, 2, 8, 16), "k must be"),
        ((2, 4, 8, 16), (2, 2, 8, 32), "k must be"),
    ],
)
def test_shape_errors(q_shape, k_shape, message):
    with pytest.raises(ValueError, match=message):
        attention_stats(torch.randn(q_shape), torch.randn(k_shape), backend="triton")


def test_argument_errors():
    q, k, _ = qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_stats(q, k, key_padding_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="q_positions"):
        attention_stats(q, k, q_positions=torch.arange(1, 9))
    with pytest.raises(ValueError, match="spans"):
        attention_stats(q, k, spans=[1, 2, 3])
    with pytest.raises(ValueError, match="return_output"):
        attention_stats(q, k, return_output=True)
    with pytest.raises(ValueError, match="backend"):
        attention_stats(q, k, backend="cuda")
    with pytest.raises(ValueError, match="scale"):
        attention_stats(q, k, scale=-1.0, backend="triton")


def test_kv_cache_layout_output_and_repeated_spans():
    # q_len < k_len with default positions (derived inside the kernel), a span list reused
    # across calls (cached on the device), and the output's [batch, q, head, d] memory order
    q, k, v = qkv(2, 4, 2, 70, 150, 32, seed=9)
    kw = dict(sink_size=3, recent_window=20, spans=[[5, 40], [100, 149]], return_output=True)
    for _ in range(2):
        got, want = both(q, k, v, **kw)
        assert_stats_close(got, want, q, k)
    assert got.output.transpose(1, 2).is_contiguous()


def test_fast_tanh_only_for_16_bit_inputs_on_a_gpu():
    # the hardware tanh's 2^-11 relative error is fine for bf16/fp16 scores, not for fp32 ones,
    # and the interpreter cannot run its inline PTX
    assert attention_stats_module.fast_tanh(torch.bfloat16, on_gpu=True)
    assert attention_stats_module.fast_tanh(torch.float16, on_gpu=True)
    assert not attention_stats_module.fast_tanh(torch.float32, on_gpu=True)
    assert not attention_stats_module.fast_tanh(torch.bfloat16, on_gpu=False)
