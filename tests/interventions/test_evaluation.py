import numpy as np
import pytest
import torch

from interventions.engine import intervene
from interventions.evaluation import bootstrap_ci, evaluate, matched_control, sweep, top_heads
from interventions.specs import ScaleOutput, ZeroAblation, load_specs
from workbench.errors import InterventionError, TaskBuildError
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
    assert bootstrap_ci(np.array([5.0])) == (5.0, 5.0)
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
    with pytest.raises(InterventionError, match="control=False"):
        matched_control(load_specs({"kind": "zero", "heads": [[0, 0], [0, 1]]}), 1, 3,
                        np.random.default_rng(0))  # fmt: skip


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
    one = evaluate(tiny_model, task, ZeroAblation(heads=[tuple(frame.iloc[0][["layer", "head"]])]),
                   control=False, path="streamed")  # fmt: skip
    assert one.table.loc["loss", "diff"] == pytest.approx(frame.iloc[0]["loss_diff"], abs=1e-5)
    assert frame.attrs["baseline"]["loss"] == pytest.approx(one.table.loc["loss", "baseline"])


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
