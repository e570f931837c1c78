import numpy as np
import pytest
import torch

from probes.sinks import HIDDEN_SINK_THRESHOLD, sink_statistics
from workbench.errors import ShapeError
from workbench.scanner import scan
from workbench.tasks import PromptSet

TEXT = "when mary and john went to the store john gave a drink to mary and the cat sat on the mat"


def test_sink_statistics_follow_their_definitions(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    n = len(ids)
    stats = sink_statistics(tiny_model, ids, min_queries=4, path="pattern")
    bridge = tiny_model.bridge()
    _, cache = bridge.run_with_cache(ids[None])
    group = tiny_model.info.group_size
    for layer in range(tiny_model.info.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q_pos, k_pos]
        alpha = pattern.sum(1) / torch.arange(n, 0, -1)  # [head, k_pos]: ACT's c_k / (N - k)
        keys = torch.arange(1, n - 3)  # k >= 1 and seen by >= 4 queries
        best = alpha[:, keys].max(-1)
        np.testing.assert_allclose(stats["hidden_sink_score"][layer], best.values, atol=1e-6)
        np.testing.assert_array_equal(stats["hidden_sink_position"][layer], keys[best.indices])
        np.testing.assert_array_equal(
            stats["hidden_sink_token"][layer], ids[keys[best.indices]].float()
        )
        count = (alpha[:, keys] > HIDDEN_SINK_THRESHOLD).sum(-1)
        np.testing.assert_array_equal(stats["hidden_sink_count"][layer], count.float())
        v = cache[f"blocks.{layer}.attn.hook_v"][0]  # [pos, kv_head, d_head]
        for head in range(tiny_model.info.n_heads):
            written = v[:, head // group] @ bridge.W_O[layer, head]  # [pos, d_model]
            norms = written.norm(dim=-1)
            assert stats["value_norm_first"][layer, head] == pytest.approx(norms[0].item(), 1e-5)
            assert stats["value_norm_other"][layer, head] == pytest.approx(
                norms[1:].mean().item(), 1e-5
            )
        resid = cache[f"blocks.{layer}.hook_resid_pre"][0].norm(dim=-1)  # [pos]
        assert stats["residual_norm_first"][layer] == pytest.approx(resid[0].item(), 1e-5)


def test_sink_statistics_agree_across_capture_paths(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    pattern = sink_statistics(tiny_model, ids, min_queries=2, path="pattern")
    streamed = sink_statistics(tiny_model, ids, min_queries=2, path="streamed")
    assert pattern.keys() == streamed.keys()
    for name in pattern:
        np.testing.assert_allclose(streamed[name], pattern[name], atol=1e-5, err_msg=name)


def test_sink_statistics_need_two_tokens(tiny_model):
    with pytest.raises(ShapeError, match=">= 2 tokens"):
        sink_statistics(tiny_model, torch.tensor([1]))


def test_sink_probes_fill_tables_and_labels(tiny_model):
    prompts = PromptSet("p", (TEXT, "the dog ran to the park and the bird sat on the tree"))
    result = scan(
        tiny_model, prompts, probes="sink,hidden_sink,value_drain,residual_peak", progress=False
    )
    assert set(result.tables) == {
        "sink", "hidden_sink", "hidden_sink_count", "value_drain", "residual_peak"
    }  # fmt: skip
    hidden = result.tables["hidden_sink"]
    assert hidden.threshold == HIDDEN_SINK_THRESHOLD
    assert (hidden.selected == (hidden.values > 0.1)).all()
    peak = result.tables["residual_peak"].values  # per layer, repeated over heads
    assert (peak == peak[:, :1]).all()
    assert result.tables["value_drain"].values.shape == (2, 4)
