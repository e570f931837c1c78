"""The two capture paths agree: TransformerLens patterns vs streamed kernel statistics."""

import numpy as np
import pytest

from workbench import capture
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
