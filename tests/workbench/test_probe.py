"""The probe API and the scan steps of workbench.probe (the whole scan: test_scan.py)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.arguments import key_value
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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, (1024,)),
        ("1024", (1024,)),
        ("512, 1024", (512, 1024)),
        ("[512, 1024]", (512, 1024)),
        ([512, "1024"], (512, 1024)),
        (2048.0, (2048,)),
    ],
)
def test_list_options_take_one_value_a_comma_list_or_a_json_list(tiny_model, value, expected):
    ctx = ScanContext(tiny_model, PromptSet("p", ("a",)), options={"lengths": value})
    assert ctx.option("lengths", (1, 2)) == expected
    assert ScanContext(tiny_model, PromptSet("p", ("a",))).option("lengths", (1, 2)) == (1, 2)


@pytest.mark.parametrize(
    ("value", "default", "message"),
    [
        ("1.5", (1,), "lengths='1.5': expected a single int, a comma list or a JSON list"),
        ("[1, [2]]", (1,), "expected a single int"),
        ("[1,", (1,), "expected a single int"),
        ('{"a": 1}', (1,), "expected a single int"),
        (1.5, 1, "expected int"),
        (2, True, "expected bool"),
        (True, 0.5, "expected float"),
    ],
)
def test_bad_option_values_are_refused(tiny_model, value, default, message):
    ctx = ScanContext(tiny_model, PromptSet("p", ("a",)), options={"lengths": value})
    with pytest.raises(ProbeOptionError, match=message):
        ctx.option("lengths", default)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=6),
    st.sampled_from([0.5, 1, "x"]),
)
def test_every_form_of_a_list_option_means_the_same(tiny_model, items, like):
    """The CLI's ``--option k=v`` (through ``key_value``) and the API's values, as one value, a
    comma list or a JSON list, all give the same tuple, its items of the default's type."""
    kind = type(like)
    expected = tuple(kind(i) if kind is not str else str(i) for i in items)
    forms = [items, tuple(items), ",".join(map(str, items)), json.dumps(items)]
    forms += [
        key_value(f"k={','.join(map(str, items))}")[1],
        key_value(f"k={json.dumps(items)}")[1],
    ]
    if len(items) == 1:
        forms += [items[0], str(items[0]), key_value(f"k={items[0]}")[1]]
    for form in forms:
        ctx = ScanContext(tiny_model, PromptSet("p", ("a",)), options={"k": form})
        assert ctx.option("k", (like,)) == expected, form


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
