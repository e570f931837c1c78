"""The probes against the toy reference models' cards (data/models/toy-*/heads.json), whose
numbers come from the toys' own measurement code (workbench/toys/evidence.py)."""

import json

import numpy as np
import pytest

from probes.sinks import sink_statistics
from workbench.builtins import TOY_MODELS_DIR
from workbench.capture import head_statistics
from workbench.models import load
from workbench.tasks import get_task


@pytest.fixture(scope="module")
def toy_bb():
    card = json.loads((TOY_MODELS_DIR / "toy-bb" / "heads.json").read_text())
    return load("toy-bb", device="cpu"), card


def test_toy_bb_extreme_tokens_reproduce_its_card(toy_bb):
    """On sequences of the card's evaluation sample, sink mass, value drain and residual norms
    equal the card's extreme-token table (Guo et al.'s three phenomena, measured there by
    independent code): exactly at <bos>, whose value and residual do not depend on the sequence,
    and within sampling noise for the means over an eighth of the sample. No head is a sink
    (the card: <bos> receives at most 0.15 of the attention)."""
    model, card = toy_bb
    evaluation, expected = card["evaluation"], card["extreme_tokens"]
    batch = get_task("toy-bb").sample(evaluation["n_sequences"], evaluation["sample_seed"])
    sequences = batch.input_ids[: evaluation["n_sequences"] // 8]
    sinks = [sink_statistics(model, ids, path="streamed") for ids in sequences]
    first = np.stack([head_statistics(model, ids)["first_token_mass"] for ids in sequences])

    def per_layer(name):  # mean over sequences (and heads)
        stacked = np.stack([item[name] for item in sinks])  # [seq, layer(, head)]
        return stacked.reshape(len(sinks), stacked.shape[1], -1).mean(axis=(0, 2))

    np.testing.assert_allclose(per_layer("value_norm_first"), expected["value_norm_bos"], atol=1e-4)
    np.testing.assert_allclose(
        per_layer("residual_norm_first"), expected["residual_norm_bos"], rtol=1e-4
    )
    np.testing.assert_allclose(
        first.mean(axis=(0, 2)), expected["bos_attention_received"], atol=0.02
    )
    np.testing.assert_allclose(
        per_layer("value_norm_other"), expected["value_norm_other"], atol=0.02
    )
    np.testing.assert_allclose(
        per_layer("residual_norm_other"), expected["residual_norm_other"], rtol=0.05
    )
    assert first.mean(0).max() < 0.3  # no sink head, as the card says
