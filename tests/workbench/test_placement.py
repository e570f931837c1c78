"""Model placement: device maps, and the hooks that make each placed module's GPU current."""

import numpy as np
import pytest
import torch

from workbench import placement
from workbench.capture import head_statistics
from workbench.models import load

PATH = "streamed"


def test_device_map_load_gives_the_same_statistics(tiny_llama_dir, tiny_model):
    """Placement by device map (one device here; two GPUs in benchmarks/scaling_bench.py)."""
    layout = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    placed = load(str(tiny_llama_dir), device_map={name: "cpu" for name in layout})
    assert placed.device == torch.device("cpu")
    ids = tiny_model.tokenize("when mary and john went to the store john gave a drink to mary")
    expected = head_statistics(tiny_model, ids, path=PATH)
    got = head_statistics(placed, ids, path=PATH)
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, atol=1e-6)
    with pytest.raises(ValueError, match="either device .* or device_map"):
        load(str(tiny_llama_dir), device="cpu", device_map="auto")


def test_follow_device_map_makes_each_layers_gpu_current(tiny_llama_dir, monkeypatch):
    """The hooks' logic without GPUs: the CUDA calls are recorded instead of made."""
    model = load(str(tiny_llama_dir), device="cpu").hf
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1}
    calls, synced = [], []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 7)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    placement.follow_device_map(model)
    model(torch.tensor([[1, 5, 6]]))
    assert calls == [0, 0, 1, 7]  # embedding, layer 0, layer 1, then the caller's device again
    assert synced == [0, 1]
    assert placement._cuda_index("cuda:1") == 1 and placement._cuda_index("disk") is None


def test_resolve_checks_the_choice_before_loading():
    assert placement.resolve("cpu") == (torch.device("cpu"), {})
    memory = {0: "1GiB"}
    assert placement.resolve(None, "auto", memory) == (
        None,
        {"device_map": "auto", "max_memory": memory},
    )
    with pytest.raises(ValueError, match="max_memory applies to a device_map"):
        placement.resolve(None, max_memory=memory)
