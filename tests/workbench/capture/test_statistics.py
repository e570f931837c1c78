"""The two capture paths agree: TransformerLens patterns vs streamed kernel statistics."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from workbench import capture
from workbench.capture.statistics import QueryLayout
from workbench.tasks.corpus import corpus


def assert_paths_agree(model, ids, atol: float) -> None:
    pattern = capture.head_statistics(model, ids, path="pattern")
    streamed = capture.head_statistics(model, ids, path="streamed")
    assert pattern.keys() == streamed.keys() == set(capture.STATISTICS)
    for name in capture.STATISTICS:
        shape = (model.info.n_layers, model.info.n_heads)
        assert pattern[name].shape == streamed[name].shape == shape
        np.testing.assert_allclose(pattern[name], streamed[name], atol=atol, err_msg=name)


def test_paths_agree_on_tiny_llama(tiny_model):
    ids = tiny_model.tokenize("the cat sat on the mat and the dog ran to the park")
    assert_paths_agree(tiny_model, ids, atol=1e-5)


@pytest.mark.slow
def test_paths_agree_on_smollm2_at_700_tokens(smollm2):
    ids = smollm2.tokenize(corpus("prose")[:3000])
    assert 600 <= ids.numel() <= 1024
    assert_paths_agree(smollm2, ids, atol=1e-4)


@given(
    q_len=st.integers(1, 60),
    causal=st.booleans(),
    window=st.none() | st.integers(1, 70),
    chunk=st.none() | st.integers(1, 70),
)
def test_query_layout_from_mask_counts_the_visible_keys(q_len, causal, window, chunk):
    """The O(L) layout equals one read off the explicit L×L mask built here."""
    if chunk is not None and not causal:
        chunk = None  # chunked attention is causal (Llama 4)
    p, j = torch.arange(q_len)[:, None], torch.arange(q_len)[None]
    seen = (j <= p) if causal else torch.ones(q_len, q_len, dtype=torch.bool)
    if window is not None:
        seen &= (p - j).abs() < window
    if chunk is not None:
        seen &= p // chunk == j // chunk
    layout = QueryLayout.from_mask(q_len, causal=causal, window=window, chunk=chunk)
    assert torch.equal(layout.visible, seen.sum(-1).float())
    assert torch.equal(layout.sees_first, seen[:, 0])
    assert torch.equal(layout.seen_by, seen.sum(0).float())
    assert torch.equal(layout.visible, QueryLayout.from_pattern(seen[None].float()).visible)
