import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interventions.engine import intervene
from interventions.evaluation import (
    NoControlError,
    bootstrap_ci,
    evaluate,
    knockout_curve,
    matched_control,
    sweep,
    top_heads,
)
from interventions.specs import ScaleOutput, ZeroAblation, load_specs
from workbench.errors import InterventionError, TaskBuildError
from workbench.scores import ScoreTable
from workbench.tasks import Loss, NextToken

PROMPTS = ["the cat sat on the", "when mary and john went to the", "the dog ran to the",
           "it was a big red", "the sun was small and the night was"]  # fmt: skip
TARGETS = ["mat", "store", "park", "house", "blue"]
FOILS = ["dog", "park", "mat", "tree", "red"]


@pytest.fixture(scope="module")
def task():
    return NextToken(PROMPTS, TARGETS, FOILS)


def test_bootstrap_ci():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    low, high = bootstrap_ci(values, n_bootstrap=2000, seed=0)
    assert 1.0 <= low < values.mean() < high <= 4.0
    assert np.isnan(bootstrap_ci(np.array([5.0]))).all()  # one example: no interval
    assert bootstrap_ci(np.zeros(6)) == (0.0, 0.0)


def test_matched_control_same_layers_disjoint_seeded():
    specs = load_specs([{"kind": "zero", "heads": [[0, 1], [1, 2], [1, 3]]},
                        {"kind": "uniform", "heads": [[1, 0]]}])  # fmt: skip
    a = matched_control(specs, 2, 8, np.random.default_rng(3))
    b = matched_control(specs, 2, 8, np.random.default_rng(3))
    assert a == b
    taken = {h for s in specs for h in s.heads}
    for spec, control in zip(specs, a, strict=True):
        assert type(control) is type(spec)
        assert sorted(lay for lay, _ in control.heads) == sorted(lay for lay, _ in spec.heads)
        assert not taken & set(control.heads)
    excluded = matched_control(specs, 2, 8, np.random.default_rng(3), exclude=[(1, 4), "1.5"])
    assert not {(1, 4), (1, 5)} & {h for c in excluded for h in c.heads}
    with pytest.raises(NoControlError, match="control=False") as raised:
        matched_control(load_specs({"kind": "zero", "heads": [[0, 0], [0, 1]]}), 1, 3,
                        np.random.default_rng(0))  # fmt: skip
    assert raised.value.for_cli().endswith("pass --controls 0")


def test_matched_control_borrows_from_the_nearest_layers():
    """Issue 16: six of the top ten heads in one layer of four untouched heads used to stop the
    control; now the nearest layers lend the rest, and a note says so."""
    spec = load_specs({"kind": "zero", "heads": [[2, h] for h in range(6)]})  # layer 2: 8 heads
    notes: list[str] = []
    exclude = [(2, 6), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6)]
    (control,) = matched_control(spec, 5, 8, np.random.default_rng(0), exclude, notes)
    layers = [lay for lay, _ in control.heads]
    assert layers.count(2) == 1 and layers.count(1) == 1  # layer 1 has one free head left
    assert layers.count(3) == 4  # then the layer above, the next nearest
    assert notes == [
        "layer 2: 1 of its 6 control heads drawn there, 1 from layer 1, 4 from layer 3"
    ]
    assert len(set(control.heads)) == 6 and not set(control.heads) & set(exclude)


@settings(max_examples=60, deadline=None)
@given(
    n_layers=st.integers(1, 5),
    n_heads=st.integers(1, 6),
    data=st.data(),
)
def test_controls_always_exist_when_the_model_has_the_heads(n_layers, n_heads, data):
    """For any heads and exclusions: a control exists exactly when enough heads are untouched;
    it has as many distinct heads as the spec, none touched or excluded, and keeps the spec's
    heads per layer wherever that layer has enough untouched heads."""
    every = [(lay, h) for lay in range(n_layers) for h in range(n_heads)]
    heads = data.draw(st.lists(st.sampled_from(every), min_size=1, unique=True))
    exclude = data.draw(st.lists(st.sampled_from(every), unique=True))
    (spec,) = load_specs({"kind": "zero", "heads": [list(h) for h in heads]})
    free = set(every) - set(heads) - set(exclude)
    rng = np.random.default_rng(data.draw(st.integers(0, 100)))
    if len(free) < len(heads):
        with pytest.raises(NoControlError, match="a spec uses"):
            matched_control([spec], n_layers, n_heads, rng, exclude)
        return
    notes: list[str] = []
    (control,) = matched_control([spec], n_layers, n_heads, rng, exclude, notes)
    assert len(set(control.heads)) == len(heads) and set(control.heads) <= free
    for layer in spec.layers:
        if len([h for h in free if h[0] == layer]) >= len(spec.heads_in(layer)):
            assert not any(n.startswith(f"layer {layer}:") for n in notes)


def test_identity_intervention_changes_nothing(tiny_model, task):
    r = evaluate(tiny_model, task, ScaleOutput(heads=[(1, 0)], factor=1.0), n_controls=1,
                 path="streamed")  # fmt: skip
    row = r.table.loc["logit_diff"]
    # rows of one batched pass differ from each other by float rounding only
    for key in ("diff", "ci_low", "ci_high", "control_diff"):
        assert row[key] == pytest.approx(0, abs=1e-5)
    assert r.n_examples == len(PROMPTS)


@torch.no_grad()
def test_evaluate_matches_direct_computation(tiny_model, task):
    spec = ZeroAblation(heads=[(1, 1), (0, 2)])
    r = evaluate(tiny_model, task, [spec], n_controls=2, seed=5, path="pattern", batch_size=2)
    expected_base, expected_int = [], []
    for prompt, target, foil in zip(PROMPTS, TARGETS, FOILS, strict=True):
        ids = tiny_model.tokenize(prompt)
        t, f = (tiny_model.tokenizer(w, add_special_tokens=False)["input_ids"][0]
                for w in (target, foil))  # fmt: skip
        clean = tiny_model.hf(ids[None]).logits[0, -1]
        ablated = intervene(tiny_model, ids, spec, keep=1, path="streamed")[0, -1]
        expected_base.append(float((clean[t] - clean[f]).detach()))
        expected_int.append(float(ablated[t] - ablated[f]))
    np.testing.assert_allclose(r.per_example["baseline"]["logit_diff"], expected_base, atol=1e-4)
    np.testing.assert_allclose(r.per_example["intervened"]["logit_diff"], expected_int, atol=1e-4)
    table = r.table.loc["logit_diff"]
    assert table["ci_low"] <= table["diff"] <= table["ci_high"]
    assert len(r.controls) == 2 and r.to_dict()["controls"][0][0]["kind"] == "zero"
    again = evaluate(tiny_model, task, [spec], n_controls=2, seed=5, path="streamed")
    assert again.controls == r.controls
    np.testing.assert_allclose(again.table.to_numpy(), r.table.to_numpy(), atol=1e-4)
    assert "matched random control" in r.summary() and "<table" in r._repr_html_()
    # the spread of the draws: each draw's mean difference, their sd, min and max
    draws = (r.control_draws["logit_diff"] - r.per_example["baseline"]["logit_diff"]).mean(1)
    assert r.control_draws["logit_diff"].shape == (2, len(PROMPTS))
    np.testing.assert_allclose(
        table[["control_draw_min", "control_draw_max"]], [min(draws), max(draws)]
    )
    assert table["control_draw_sd"] == pytest.approx(np.std(draws, ddof=1))
    assert table["control_diff"] == pytest.approx(draws.mean())
    assert r.to_dict()["notes"] == [] and len(r.to_dict()["control_draws"]["logit_diff"]) == 2
    assert r.to_pandas() is r.table
    chosen, control = r.plot("logit_diff").data  # one bar group per metric, as in the lab
    assert (chosen.name, control.name) == ("chosen heads", "matched random heads")
    assert list(chosen.x) == list(control.x) == ["logit_diff"]
    np.testing.assert_allclose([chosen.y[0], control.y[0]], [table["diff"], table["control_diff"]])
    np.testing.assert_allclose(chosen.error_y.array, [table["ci_high"] - table["diff"]])
    assert [list(t.x) for t in r.plot().data] == [list(r.metrics)] * 2  # every metric
    with pytest.raises(InterventionError, match="no metric"):
        r.plot("nope")


def test_sweep_rows_and_baseline(tiny_model):
    task = Loss(n=3, length=12, text=" ".join(PROMPTS * 4))
    frame = sweep(tiny_model, task, kind="zero", path="streamed", max_rows=6)
    assert len(frame) == tiny_model.info.n_layers * tiny_model.info.n_heads
    assert {"layer", "head", "loss", "loss_diff", "loss_ci_low", "loss_ci_high"} <= set(frame)
    diffs = frame["loss_diff"].abs().to_numpy()
    assert (np.diff(diffs) <= 1e-12).all()  # largest effect first
    top = tuple(int(v) for v in frame.iloc[0][["layer", "head"]])
    one = evaluate(tiny_model, task, ZeroAblation(heads=[top]), control=False, path="streamed")
    assert one.table.loc["loss", "diff"] == pytest.approx(frame.iloc[0]["loss_diff"], abs=1e-5)
    assert frame.attrs["baseline"]["loss"] == pytest.approx(one.table.loc["loss", "baseline"])


def test_evaluate_borrows_control_heads_and_says_so(tiny_model, task):
    every = [(0, h) for h in range(tiny_model.info.n_heads)]  # all of layer 0
    r = evaluate(tiny_model, task, ZeroAblation(heads=every[:3]), n_controls=2,
                 control_exclude=[every[3]], path="streamed")  # fmt: skip
    assert r.notes == ["layer 0: 0 of its 3 control heads drawn there, 3 from layer 1"]
    assert all(lay == 1 for c in r.controls for s in c for lay, _ in s.heads)
    assert "control borrowed heads: layer 0" in r.summary()


def test_knockout_curve_top_k_against_random_heads(tiny_model, task):
    info = tiny_model.info
    values = (
        np.arange(info.n_layers * info.n_heads, dtype=np.float32)
        .reshape(info.n_layers, info.n_heads)[::-1, ::-1]
        .copy()
    )  # head 0.0 scores highest, then 0.1, ...
    per_item = np.stack([values, values + 0.5])  # two items: an interval
    table = ScoreTable.from_items("s", per_item, "d", threshold=5.6, label="s")  # 0.0 .. 0.1
    curve = knockout_curve(tiny_model, task, table, ks=(1, 3), n_controls=2, path="streamed")
    frame = curve.to_pandas()
    assert frame["k"].tolist() == [1, 2, 3] and frame["all_labelled"].tolist() == [
        False,
        True,
        False,
    ]
    assert frame["heads"].tolist() == ["0.0", "0.0, 0.1", "0.0, 0.1, 0.2"]
    assert curve.n_labelled == 2
    labelled = {(0, 0), (0, 1)}
    for row, drawn in zip(frame.itertuples(), curve.controls, strict=True):
        assert len(drawn) == 2 and all(len(d) == row.k for d in drawn)
        assert not any(set(d) & labelled for d in drawn)  # random heads are never labelled
    one = evaluate(tiny_model, task, ZeroAblation(heads=[(0, 0), (0, 1)]), control=False,
                   path="streamed")  # fmt: skip
    assert frame.loc[1, "logit_diff_diff"] == pytest.approx(
        one.table.loc["logit_diff", "diff"], abs=1e-5
    )
    fig = curve.plot()
    names = [t.name for t in fig.data]
    assert names[-2:] == ["top-k heads", "random heads (mean of draws)"]
    assert list(fig.data[-2].x) == ["1", "2 (all labelled)", "3"]
    np.testing.assert_allclose(fig.data[-2].y, frame["logit_diff_intervened"])
    assert "k=2 (all labelled)" in curve.summary() and curve.to_dict()["rows"][1]["k"] == 2
    with pytest.raises(InterventionError, match="ks must be positive integers"):
        knockout_curve(tiny_model, task, table, ks=(0,))
    with pytest.raises(InterventionError, match="scores must be"):
        knockout_curve(tiny_model, task, np.zeros((1, 1)))


def test_top_heads():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, np.nan, 0.7]])
    assert top_heads(scores, 3) == [(0, 1), (1, 2), (1, 0)]


def test_bad_task(tiny_model):
    with pytest.raises(InterventionError, match="not a task"):
        evaluate(tiny_model, object(), ZeroAblation(heads=[(0, 0)]))
    with pytest.raises(TaskBuildError, match="unknown metric task 'nope'"):
        evaluate(tiny_model, "nope", ZeroAblation(heads=[(0, 0)]))
    with pytest.raises(TaskBuildError, match="unknown metric task 'toy-bb'"):
        evaluate(tiny_model, "toy-bb", ZeroAblation(heads=[(0, 0)]))  # a toy training task


def test_corrupted_variant_must_align(tiny_model):
    task = NextToken(["the cat sat"], ["on"], corrupted=["the cat sat on"])
    with pytest.raises(TaskBuildError, match="line up"):
        task.batches(tiny_model, 4)
    ok = NextToken(["the cat sat"], ["on"], corrupted=["a dog ran"])
    (batch,) = ok.batches(tiny_model, 4)
    assert batch.variants["corrupted"].shape == batch.tokens.shape
    torch.testing.assert_close(batch.tokens[0, 0], batch.variants["corrupted"][0, 0])
