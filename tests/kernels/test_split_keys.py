"""The stats kernel with its keys split into shares and merged (`_combine_splits`, the decoding
path), under the CPU interpreter, against the torch reference: every variant, with padding,
query subsets (one decoding query), spans, sinks, the recent window and the output."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention_stats, reference
from tests.kernels.test_variant_kernels import CASES, assert_close, qkv

stats_module = importlib.import_module("kernels.attention_stats")
pytestmark = pytest.mark.usefixtures("interpreter")

STATS_KW = dict(sink_size=3, recent_window=9, spans=[[2, 9], [60, 110]])


def split_stats(q, k, v, splits, *, causal=True, q_positions=None, key_padding_mask=None, **kw):
    """`attention_stats` through the Triton kernel with ``splits`` key shares."""
    a = reference.check_args(q, k, scale=None, q_positions=q_positions,
                             key_padding_mask=key_padding_mask, materialize_positions=False,
                             **STATS_KW | {"recent_window": 9}, **kw)  # fmt: skip
    return stats_module._triton_stats(q, k, v, a, causal=causal, sink_size=3, recent_window=9,
                                      return_output=True, splits=splits)  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_keys_equal_the_reference(name, naive_attention):
    kw = dict(CASES[name])
    q, k, v, pad = qkv(d=kw.pop("d", 32), d_v=kw.pop("d_v", None))
    # the last two queries, as when decoding against a cache, and every query
    for q_positions in (torch.tensor([140, 149]), None):
        qq = q if q_positions is None else q[:, :, q_positions]
        common = dict(key_padding_mask=pad, q_positions=q_positions, **kw)
        want = attention_stats(qq, k, v, backend="torch", return_output=True, **STATS_KW, **common)
        p = naive_attention(qq, k, v, **common)["p"]
        got = split_stats(qq, k, v, 3, **common)
        assert_close(got, want, p, atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(splits=st.integers(1, 9), k_len=st.integers(1, 200), causal=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_any_number_of_shares_gives_the_same_statistics(splits, k_len, causal, seed):
    q, k, v, pad = qkv(q_len=1, k_len=k_len, seed=seed)
    common = dict(key_padding_mask=pad, q_positions=torch.tensor([k_len - 1]), causal=causal)
    one = split_stats(q, k, v, 1, **common)
    many = split_stats(q, k, v, splits, **common)
    for name in ("lse", "entropy", "max_prob", "sink_mass", "outside_mass", "span_mass", "output"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(many.argmax, one.argmax)


def test_share_count_follows_the_grid():
    # a decoding step (32 programs on 132 multiprocessors) is split; a long prefill is not
    assert stats_module.key_splits(32, 32768, 64, 132) == 17
    assert stats_module.key_splits(32, 512, 64, 132) == 2  # at least four key blocks a share
    assert stats_module.key_splits(32, 100, 64, 132) == 1
    assert stats_module.key_splits(4096, 32768, 64, 132) == 1
    # a decoding step gets 16-row blocks on a GPU (not 128 rows of which one is real)
    assert stats_module.block_sizes(128, True, q_len=1) == (16, 64, 4, 3)
    assert stats_module.block_sizes(128, True, q_len=4096) == (128, 64, 4, 3)
    assert stats_module.block_sizes(128, False, q_len=1) == (32, 32, 4, 1)
