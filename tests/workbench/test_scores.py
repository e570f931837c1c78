"""Score tables with intervals: the bootstrap, the label rule (lower bound above the threshold,
else tentative) and the trial counts."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import ShapeError
from workbench.scores import Interval, ScoreTable, bootstrap, resampled_means


def test_bootstrap_matches_resampling_the_items_directly():
    values = np.random.default_rng(1).normal(size=37)
    rng = np.random.default_rng(0)
    index = rng.integers(0, values.size, size=(1000, values.size))
    expected = np.quantile(values[index].mean(1), [0.025, 0.975])
    np.testing.assert_allclose(bootstrap(values), expected, rtol=1e-12)


def test_resampled_means_leave_nan_items_out():
    x = np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])  # [n=3, 2 cells]
    means = resampled_means(x, np.random.default_rng(0), 200)
    # a resample of 3 items holds 1-3 finite ones: its mean is one of their averages
    possible = [1.0, 5 / 3, 2.0, 7 / 3, 3.0]
    finite = means[:, 0][np.isfinite(means[:, 0])]
    assert np.isclose(finite[:, None], possible).any(1).all() and len(finite) >= 190
    assert np.isnan(means[:, 1]).all()  # no finite item, no mean


def test_label_rule_needs_the_lower_bound_above_the_threshold():
    per_item = np.zeros((8, 1, 3))
    per_item[:, 0, 0] = 0.6  # always above 0.3: labelled
    per_item[:, 0, 1] = [0.9, 0.0] * 4  # mean 0.45 above 0.3, but half the items at 0: tentative
    per_item[:, 0, 2] = 0.2  # below: neither
    table = ScoreTable.from_items("s", per_item, "d", threshold=0.3, label="s")
    np.testing.assert_allclose(table.values, [[0.6, 0.45, 0.2]])
    assert table.selected.tolist() == [[True, False, False]]
    assert table.tentative.tolist() == [[False, True, False]]
    assert table.interval.n_trials.tolist() == [[8, 8, 8]]
    assert table.rule == "lower 95% bootstrap bound of s > 0.3"
    assert list(table.to_frame().columns) == ["layer", "head", "s", "s_low", "s_high", "s_trials"]


def test_one_item_gives_no_interval_and_no_label():
    table = ScoreTable.from_items("s", np.full((1, 2, 2), 0.9), "d", threshold=0.3, label="s")
    assert np.isnan(table.interval.low).all() and table.interval.n_trials.max() == 1
    assert not table.selected.any() and table.tentative.all()


def test_a_table_without_interval_labels_by_its_score():
    table = ScoreTable("s", np.array([[0.1, 0.5]]), "d", threshold=0.3, label="s")
    assert table.selected.tolist() == [[False, True]] and not table.tentative.any()
    assert table.rule == "s > 0.3"


def test_shapes_are_checked():
    bounds = np.zeros((2, 3))
    with pytest.raises(ShapeError, match="differ in shape"):
        Interval(bounds, bounds, np.zeros((3, 2)))
    with pytest.raises(ShapeError, match="does not match"):
        ScoreTable("s", np.zeros((3, 2)), "d", interval=Interval(bounds, bounds, bounds))


def test_groups_are_resampled_separately_and_combined():
    a = np.array([0.8, 0.9, 1.0])[:, None, None]
    b = np.array([0.1, 0.2])[:, None, None]
    table = ScoreTable.from_items("gap", [a, b], "d", combine=lambda m: m[0] - m[1])
    np.testing.assert_allclose(table.values, [[0.75]])
    assert 0.6 <= table.interval.low[0, 0] < 0.75 < table.interval.high[0, 0] <= 0.9
    assert table.interval.n_trials.tolist() == [[2]]  # the smaller group


@settings(max_examples=60, deadline=None)
@given(
    per_item=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6),
        elements=st.one_of(st.floats(-5, 5), st.just(np.nan)),
    ),
    threshold=st.floats(-5, 5),
)
def test_intervals_hold_the_score_and_labels_are_a_subset(per_item, threshold):
    """For any per-item values: the bounds lie within the finite items' range and around the
    score, labelled heads are above the threshold, tentative and labelled never overlap, and a
    head has an interval exactly when two or more of its items are finite."""
    table = ScoreTable.from_items("s", per_item, "d", threshold=threshold, label="s")
    low, high, n = table.interval.low, table.interval.high, table.interval.n_trials
    np.testing.assert_array_equal(n, np.isfinite(per_item).sum(0))
    assert (np.isfinite(low) == (n >= 2)).all()
    has = np.isfinite(low)
    with np.errstate(invalid="ignore"):
        lo_items = np.nanmin(np.where(np.isfinite(per_item), per_item, np.inf), axis=0)
        hi_items = np.nanmax(np.where(np.isfinite(per_item), per_item, -np.inf), axis=0)
    tol = 1e-5
    assert (low[has] >= lo_items[has] - tol).all() and (high[has] <= hi_items[has] + tol).all()
    assert (low[has] <= table.values[has] + tol).all()
    assert (table.values[has] <= high[has] + tol).all()
    assert not (table.selected & table.tentative).any()
    assert (table.values[table.selected] > threshold).all()
    assert ((table.selected | table.tentative) == (table.values > threshold)).all()


def test_intervals_and_tentative_heads_roundtrip_through_the_run_file(tmp_path, tiny_model):
    from workbench.probe import publish
    from workbench.store import RunWriter, open_run

    info = tiny_model.info
    shape = (info.n_layers, info.n_heads)
    per_item = np.zeros((4, *shape), np.float32)
    per_item[:, 0, 0] = 0.9
    per_item[:, 0, 1] = [0.9, 0.9, 0.0, 0.9]

    class Probe:
        name = "p"

        def score(self, stats):
            return [ScoreTable.from_items("p", stats["m"]["x"], "d", 0.3, "p")]

    writer = RunWriter(tmp_path / "r.h5", info, {})
    group = writer.measurement("m", ["a"] * 4, [np.arange(2)] * 4, {"x": "per item"})
    group.write(0, [{"x": v} for v in per_item])
    tables, path = publish(writer, {"m": group}, [Probe()])
    with open_run(path) as run:
        table = run.score("p")
        np.testing.assert_array_equal(table.interval.low, tables["p"].interval.low)
        np.testing.assert_array_equal(table.interval.n_trials, np.full(shape, 4))
        assert table.interval.resamples == 1000 and table.interval.confidence == 0.95
        assert run.label("p").sum() == 1 and run.label("p")[0, 0]
        assert run.tentative("p").sum() == 1 and run.tentative("p")[0, 1]


def test_a_per_layer_quantity_is_told_from_a_per_head_score():
    repeated = np.repeat(np.array([[0.75], [159.0], [np.nan]]), 9, axis=1)  # residual_peak-like
    np.testing.assert_array_equal(
        ScoreTable("p", repeated, "d").layer_values, [0.75, 159.0, np.nan]
    )
    varied = repeated.copy()
    varied[1, 4] = 158.0  # one head differs: per head
    assert ScoreTable("p", varied, "d").layer_values is None
    assert ScoreTable("p", np.ones((3, 1)), "d").layer_values is None  # one head: per head
    assert ScoreTable("p", np.full((3, 4), np.nan), "d").layer_values is None  # no score


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from([0.0, 0.5, 2.0, float("nan")]), min_size=3, max_size=3),
        min_size=1,
        max_size=6,
    )
)
def test_layer_values_exactly_when_every_row_holds_one_value(rows):
    """Against a row-by-row reading: a table is per-layer when each row's values, NaN counted as
    a value, are one, and some value is finite."""
    values = np.array(rows)
    one_each = all(len({repr(float(v)) for v in row}) == 1 for row in rows)
    expected = one_each and np.isfinite(values).any()
    layer_values = ScoreTable("p", values, "d").layer_values
    assert (layer_values is not None) == expected
    if expected:
        np.testing.assert_array_equal(layer_values, values[:, 0].astype(np.float32))
