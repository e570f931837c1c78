"""Intervention results in a run file (``/results/<name>``): the writer/reader pair the explorer's
lab keeps its results with."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.errors import RunFileError, RunMismatchError
from workbench.scores import ScoreTable
from workbench.store import (
    RunWriter,
    intervention_results,
    open_run,
    write_intervention_result,
)


def _run(path, info):
    writer = RunWriter(path, info, {"k": 1})
    values = np.arange(info.n_layers * info.n_heads, dtype=np.float32)
    writer.write_score(
        ScoreTable("sink", values.reshape(info.n_layers, info.n_heads), "d", threshold=3.5)
    )
    return writer.finish()


def test_results_are_stored_listed_and_replaced(tmp_path, tiny_model) -> None:
    path = _run(tmp_path / "r.h5", tiny_model.info)
    assert intervention_results(path) == {}
    first = json.dumps({"mode": "evaluate", "table": {"loss": {"diff": 0.25}}})
    write_intervention_result(path, "b zero 1.2", first, tiny_model.info)
    write_intervention_result(path, "a sweep", json.dumps({"mode": "sweep"}), tiny_model.info)
    assert list(intervention_results(path)) == ["a sweep", "b zero 1.2"]  # name order
    assert json.loads(intervention_results(path)["b zero 1.2"]) == json.loads(first)
    write_intervention_result(path, "b zero 1.2", "{}", tiny_model.info)  # same name: replaced
    assert intervention_results(path)["b zero 1.2"] == "{}"
    with open_run(path) as run:  # the run is still whole and readable, its scores untouched
        assert run.score_names == ["sink"]
        assert run.score("sink").values[0, 1] == 1.0


def test_a_result_of_another_model_or_a_bad_name_is_refused(tmp_path, tiny_model) -> None:
    path = _run(tmp_path / "r.h5", tiny_model.info)
    other = dataclasses.replace(tiny_model.info, config_hash="0" * 16)
    with pytest.raises(RunMismatchError, match="config hash"):
        write_intervention_result(path, "x", "{}", other)
    for bad in ("", ".", "a/b", "a\x00b"):
        with pytest.raises(RunFileError, match="result name"):
            write_intervention_result(path, bad, "{}", tiny_model.info)
    for bad in ("", "{", "not json", '{"a": "\x00"}', "\x00", '"\ud800"', None):
        with pytest.raises(RunFileError, match="not JSON text"):
            write_intervention_result(path, "x", bad, tiny_model.info)
    assert intervention_results(path) == {}


TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # any character a str can encode
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1
    ).filter(lambda name: name != "."),
    value=JSON,
    ascii_only=st.booleans(),
)
def test_any_name_and_json_text_round_trip(
    tmp_path_factory, tiny_model, name: str, value, ascii_only: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)  # any character, NUL too, escaped by JSON
    path = _run(tmp_path_factory.mktemp("results") / "r.h5", tiny_model.info)
    write_intervention_result(path, name, text, tiny_model.info)
    assert intervention_results(path) == {name: text}
