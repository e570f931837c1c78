"""Model work of the explorer: one load per process, and the head views agree with each other."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from app import compute
from workbench import figures
from workbench.errors import RunMismatchError
from workbench.capture import StreamedRecorder


def test_pool_loads_each_model_once_and_checks_its_identity(tiny_model) -> None:
    pool = compute.ModelPool(device="cpu")
    first = pool.get(tiny_model.info)
    assert pool.get(tiny_model.info) is first and pool.loads == 1
    other = dataclasses.replace(tiny_model.info, config_hash="0" * 16)
    with pytest.raises(RunMismatchError, match="config hash"):
        pool.get(other)


def test_pattern_and_streamed_positions_agree(tiny_model) -> None:
    ids = tiny_model.tokenize("when mary and john went to the store john gave a drink to mary")
    layer, head = 1, 3
    pattern = figures.head_pattern(tiny_model, ids, layer, head)  # [q_pos, k_pos]
    seen = []
    positions = compute.head_positions(
        tiny_model, ids, layer, head, on_block=lambda i, n: seen.append((i, n))
    )
    assert seen == [(0, 2), (1, 2)]
    np.testing.assert_allclose(positions.first_token_mass, pattern[:, 0], atol=1e-5)
    entropy = -(pattern * np.log(np.where(pattern > 0, pattern, 1))).sum(1)
    np.testing.assert_allclose(positions.entropy, entropy, atol=1e-4)
    np.testing.assert_allclose(positions.received, pattern.sum(0), atol=1e-4)
    assert positions.top_keys(1)[0][0] == int(
        np.argmax(pattern.sum(0) / np.arange(len(ids), 0, -1))
    )


def test_running_the_first_blocks_only_changes_nothing_for_them(tiny_model) -> None:
    ids = tiny_model.tokenize("the cat sat on the mat and the dog ran to the park")
    with torch.no_grad(), StreamedRecorder(tiny_model.hf, sink_size=1) as full:
        tiny_model.hf(ids[None])
    blocks = list(compute._blocks(tiny_model)[2])
    positions = compute.head_positions(tiny_model, ids, 0, 2)
    np.testing.assert_allclose(positions.entropy, full.stats[0].entropy[0, 2].numpy(), atol=1e-6)
    assert list(compute._blocks(tiny_model)[2]) == blocks  # all blocks are back
