"""The Circuit object: JSON, storage in run files, plot, overlap, faithfulness identities."""

import json

import pytest
import torch

import workbench
from interventions.circuit import (
    Circuit,
    CircuitEdge,
    CircuitHead,
    ablation_scorer,
    faithfulness,
    overlap,
)
from workbench.errors import InterventionError, RunMismatchError
from workbench.store import RunWriter, open_run
from workbench.tasks.ioi import toy_task


def make(model_info: dict, heads: list[tuple[int, int, str]], task: str = "ioi") -> Circuit:
    return Circuit(
        model=model_info,
        task={"task": task, "n_prompts": 4, "seed": 0},
        heads=[CircuitHead(layer, head, role, {"dla": 0.5, "end_io": None})
               for layer, head, role in heads],
        edges=[CircuitEdge("0.1", "1.0", "q", -0.2), CircuitEdge("1.0", "logits", "direct", None)],
        metrics={"clean_logit_diff": 3.0},
    )  # fmt: skip


@pytest.fixture
def tiny(tiny_model):
    return tiny_model


def test_json_round_trip_and_errors(tiny, tmp_path):
    circuit = make(tiny.info.to_dict(), [(1, 0, "name mover"), (0, 1, "s-inhibition")])
    path = circuit.save(tmp_path / "c.json")
    again = Circuit.load(path)
    assert again.to_dict() == circuit.to_dict()
    assert again.by_class() == {"s-inhibition": [(0, 1)], "name mover": [(1, 0)]}
    assert "name mover" in again.classes_table() and "1.0" in again.classes_table()
    assert list(again.to_pandas()["class"]) == ["s-inhibition", "name mover"]
    bad = circuit.to_dict() | {"schema": "something else"}
    with pytest.raises(InterventionError, match="not a workbench circuit"):
        Circuit.from_dict(bad)
    with pytest.raises(InterventionError, match="schema version"):
        Circuit.from_dict(circuit.to_dict() | {"schema_version": 99})
    with pytest.raises(InterventionError, match="does not parse"):
        Circuit.from_json("{")
    with pytest.raises(InterventionError, match="no such circuit file"):
        Circuit.load(tmp_path / "missing.json")


def test_stored_in_a_new_and_in_an_existing_run_file(tiny, tmp_path):
    circuit = make(tiny.info.to_dict(), [(1, 0, "name mover")])
    fresh = tmp_path / "fresh.h5"
    circuit.store(fresh)
    assert Circuit.from_run(fresh, "ioi").to_dict() == circuit.to_dict()
    existing = tmp_path / "scan.h5"
    writer = RunWriter(existing, tiny.info, {"probes": []})
    shape = (tiny.info.n_layers, tiny.info.n_heads)
    writer.write_label("sink", torch.zeros(shape, dtype=torch.bool).numpy(), "none")
    writer.finish()
    circuit.store(existing, name="mine")
    with open_run(existing) as run:
        assert run.circuit_names == ["mine"]
        assert run.label_names == ["sink"]  # what was there survives
    other = dict(tiny.info.to_dict(), config_hash="0000")
    with pytest.raises(RunMismatchError):
        make(other, [(1, 0, "name mover")]).store(existing)


def test_plot_is_the_directed_graph_of_heads_paths_and_logits():
    circuit = make({"name": "m"}, [(1, 0, "name mover"), (0, 1, "s-inhibition")])
    fig = circuit.plot()
    names = [t.name for t in fig.data]
    # one hover trace per path kind (its legend entry), one per class, the logits
    assert names == ["q path", "direct to logits", "name mover", "s-inhibition", "logits"]
    movers = fig.data[2]
    assert (list(movers.x), list(movers.y)) == ([0.0], [1.0])  # at (head index, layer)
    assert [list(c) for c in movers.customdata] == [[1, 0]]
    q, direct = fig.data[0], fig.data[1]
    assert list(q.text) == ["0.1 → 1.0 via q: effect -0.200"]
    assert list(direct.text) == ["1.0 → logits via direct: effect not measured"]
    arrows = fig.layout.annotations  # one arrow per edge, sender -> receiver
    assert len(arrows) == 2 and all(a.showarrow for a in arrows)
    assert (arrows[0].ax, arrows[0].ay) == (1.0, 0.22) and arrows[0].y == 1.0 - 0.22
    assert arrows[0].arrowcolor != arrows[1].arrowcolor  # q and direct differ
    assert list(fig.layout.yaxis.tickvals) == [0, 1]  # integer layer ticks


def test_overlap_counts_shared_heads():
    a = make({"name": "m"}, [(1, 0, "name mover"), (0, 1, "s-inhibition"), (0, 2, "induction")])
    b = make({"name": "m"}, [(1, 0, "name mover"), (0, 1, "induction")], task="colored-objects")
    shared = overlap(a, b)
    assert shared["shared"] == [(0, 1), (1, 0)]
    assert shared["share_of_a"] == pytest.approx(2 / 3)
    assert shared["share_of_b"] == 1.0
    assert shared["jaccard"] == pytest.approx(2 / 3)
    assert shared["n_same_class"] == 1


def test_faithfulness_of_the_whole_model_is_one_and_of_nothing_is_the_floor(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_ioi_path_patching import make_ioi_llama

    model = workbench.load(str(make_ioi_llama(tmp_path / "m")))
    task = toy_task()
    clean = task.build(model.tokenizer, 4, seed=5, templates=[0])
    abc = task.corrupt(clean, model.tokenizer)
    info = model.info
    every = [(layer, head, "name mover") for layer in range(info.n_layers)
             for head in range(info.n_heads)]  # fmt: skip
    full = faithfulness(model, clean, abc, make(info.to_dict(), every), checks=False)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    empty = faithfulness(model, clean, abc, make(info.to_dict(), []), checks=False)
    assert empty["circuit_logit_diff"] == pytest.approx(empty["empty_logit_diff"], abs=1e-6)
    some = make(info.to_dict(), every[:3])
    checked = faithfulness(model, clean, abc, some, checks=True)
    assert set(checked["minimality"]) == {"0.0", "0.1", "0.2"}
    assert "name mover" in checked["completeness"]
    json.dumps(checked)  # plain types only
    # the complement of everything is nothing; of nothing, everything
    assert full["faithfulness_complement"] == pytest.approx(
        full["empty_logit_diff"] / full["model_logit_diff"], abs=1e-6
    )
    assert empty["faithfulness_complement"] == pytest.approx(1.0, abs=1e-5)
    # minimality: the drop in faithfulness F(C)/F(M) when one head leaves the circuit
    score = ablation_scorer(model, clean, abc)
    without = score([(0, 1), (0, 2)])
    assert checked["minimality"]["0.0"] == pytest.approx(
        (checked["circuit_logit_diff"] - without) / checked["model_logit_diff"], abs=1e-6
    )
    classes = faithfulness(model, clean, abc, some, checks=False, class_heads=[(0, 0)])
    assert classes["class_circuit_heads"] == 1
    assert classes["faithfulness_class_circuit"] == pytest.approx(
        score([(0, 0)]) / classes["model_logit_diff"], abs=1e-6
    )
