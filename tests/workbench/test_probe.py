"""The probe API and the scan steps of workbench.probe (the whole scan: test_scan.py)."""

import numpy as np
import pytest

from workbench.errors import ProbeOptionError
from workbench.probe import Measurement, ScanContext, measure
from workbench.tasks import PromptSet


def test_option_converts_to_the_default_type(tiny_model):
    ctx = ScanContext(
        tiny_model,
        PromptSet("p", ("a",)),
        options={"n": "12", "flag": "true", "domains": "prose,code", "single": "code", "x": 2},
    )
    assert ctx.option("n", 4) == 12
    assert ctx.option("flag", False) is True
    assert ctx.option("domains", ("prose",)) == ("prose", "code")
    assert ctx.option("single", ("prose",)) == ("code",)
    assert ctx.option("x", 0.5) == 2.0
    assert ctx.option("missing", 7) == 7
    with pytest.raises(ProbeOptionError, match="option n='12'"):
        ctx.option("n", False)
    with pytest.raises(ProbeOptionError, match="expected int"):
        ScanContext(tiny_model, PromptSet("p", ("a",)), options={"n": "many"}).option("n", 4)


def test_measure_runs_the_given_items_in_batches():
    m = Measurement(
        "m",
        texts=[f"t{i}" for i in range(5)],
        token_ids=[np.array([i]) for i in range(5)],
        definitions={"x": "the item's index, [2]"},
        measure=lambda i: {"x": np.full(2, i, dtype=np.float32)},
    )
    batches = []
    got = measure(
        m, batch_size=2, progress=False, on_batch=lambda s, b: batches.append((s, len(b)))
    )
    np.testing.assert_array_equal(got["x"][:, 0], range(5))
    assert batches == [(0, 2), (2, 2), (4, 1)]
    share = measure(m, batch_size=2, progress=False, items=[1, 3], start=1)  # rank 1 of 2, resumed
    np.testing.assert_array_equal(share["x"][:, 0], [3])
    assert measure(m, batch_size=2, progress=False, items=[]) == {}
