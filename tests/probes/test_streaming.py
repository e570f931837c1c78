import numpy as np
import pytest
import torch

from probes.streaming import outside_window_mass
from workbench.errors import ProbeOptionError
from workbench.scanner import scan
from workbench.tasks import PromptSet

TEXT = " ".join(["the cat sat on the mat and the dog ran to the park"] * 3)


def test_outside_mass_follows_its_definition(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    n, sink, recent = len(ids), 2, 5
    score = outside_window_mass(tiny_model, ids, sink_size=sink, recent_size=recent, path="pattern")
    _, cache = tiny_model.bridge().run_with_cache(ids[None])
    for layer in range(tiny_model.info.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q_pos, k_pos]
        rows = [pattern[:, i, sink : i - recent + 1].sum(-1) for i in range(sink + recent, n)]
        np.testing.assert_allclose(score[layer], torch.stack(rows, -1).mean(-1), atol=1e-6)


def test_outside_mass_agrees_across_capture_paths(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    pattern = outside_window_mass(tiny_model, ids, sink_size=1, recent_size=4, path="pattern")
    streamed = outside_window_mass(tiny_model, ids, sink_size=1, recent_size=4, path="streamed")
    np.testing.assert_allclose(streamed, pattern, atol=1e-5)


def test_prompt_shorter_than_window_is_refused(tiny_model):
    with pytest.raises(ProbeOptionError, match="no query beyond"):
        outside_window_mass(tiny_model, tiny_model.tokenize("the cat"), sink_size=4,
                            recent_size=256)  # fmt: skip


def test_streaming_probe_table(tiny_model):
    result = scan(
        tiny_model, PromptSet("p", ("a",)), probes="streaming", progress=False,
        options={"streaming_domain": "synthetic", "streaming_tokens": 40, "streaming_recent": 8},
    )  # fmt: skip
    table = result.tables["outside_window"]
    assert table.label == "long_range" and table.threshold == 0.1
    assert table.parameters["sink_size"] == 4 and table.parameters["recent_size"] == 8
    assert ((table.values >= 0) & (table.values <= 1)).all()
