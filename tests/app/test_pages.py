"""The explorer's pages as functions: the head picker and go-to box, the stored statistics of a
head (token ids decoded, never averaged), prompts of tasks and circuits, the lab's metric
definitions and its results drawn the same fresh or stored, and the compare page's label flips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import catalog, compute, server
from app.components import format_heads, parse_heads
from app.pages import head as head_page
from app.pages import lab as lab_page
from workbench.errors import WorkbenchError
from workbench.figures import token_labels, token_text
from workbench.models import ModelInfo
from workbench.store import intervention_results
from workbench.tasks import get_task

PROMPT_WORDS = "the cat sat on the mat and the dog ran to the park"
INFO = ModelInfo("m", "local", "r", "LlamaForCausalLM", 30, 9, 3, 64, 576, True, 2048, "0")


@pytest.fixture
def runs(runs_dir: Path) -> Path:
    catalog.configure(catalog.RunCatalog(runs_dir))
    compute.configure("cpu")
    return runs_dir


def _text(component) -> str:
    """Every string in a Dash component tree."""
    if isinstance(component, str | int | float):
        return str(component)
    if isinstance(component, list | tuple):
        return " ".join(_text(c) for c in component)
    children = getattr(component, "children", None)
    return "" if children is None else _text(children)


@given(
    st.lists(
        st.tuples(st.integers(0, INFO.n_layers - 1), st.integers(0, INFO.n_heads - 1)),
        unique=True,
        max_size=20,
    )
)
def test_heads_typed_as_shown_are_read_back(heads: list[tuple[int, int]]) -> None:
    assert parse_heads(format_heads(heads), INFO) == heads


@given(st.text(max_size=30))
def test_any_typed_head_is_a_head_of_the_model_or_a_message(text: str) -> None:
    """What the go-to box and the lab's head field accept: heads inside the model, or a
    ValueError with a message the page shows; nothing else."""
    try:
        heads = parse_heads(text, INFO)
    except ValueError as e:
        assert str(e)
    else:
        assert all(0 <= la < INFO.n_layers and 0 <= h < INFO.n_heads for la, h in heads)


def test_go_to_box_opens_a_head_of_the_open_run(runs: Path) -> None:
    assert server._go_to_head("L1H2", "?run=a.h5") == ("/head?run=a.h5&layer=1&head=2", "")
    assert server._go_to_head(" 0.3 ", "?a=a.h5&b=b.h5")[0].endswith("layer=0&head=3")
    _, message = server._go_to_head("1.9", "?run=a.h5")
    assert "outside the model" in message
    assert server._go_to_head("1.1, 0.2", "?run=a.h5")[1] == "type one head, e.g. 17.3"
    assert server._go_to_head("1.1", "")[1] == "open a run first"


def test_head_page_without_a_head_is_a_picker(runs: Path) -> None:
    page = head_page.layout(run="a.h5")
    assert "Pick a head" in _text(page) and "Cannot show" not in _text(page)
    bad = head_page.layout(run="a.h5", layer="9", head="0")
    assert "There is no head 9.0 in tiny-llama (2 layers × 4 heads)" in _text(bad)
    assert head_page._pick(1, 3, "a.h5") == ("/head?run=a.h5&layer=1&head=3", "open head 1.3")


def test_stored_statistics_decode_token_ids(runs: Path) -> None:
    import re

    stored = _text(head_page._stored({"run": "toy-ioi.h5", "layer": 1, "head": 1}))
    assert "basic / entropy mean" in stored  # a statistic: its mean and range
    # hidden_sink_token: the most common id, decoded by the run's model, never a mean
    shown = stored.split("sinks / hidden_sink_token ")[1].split(" sinks / ")[0]
    text, token = re.fullmatch(
        r"most common token: '(.+)' \(id (\d+)\) in \d of 2 items 2", shown
    ).groups()
    with catalog.current().open("toy-ioi.h5") as run:
        ids = run.stat("sinks", "hidden_sink_token")[:, 1, 1].astype(int).tolist()
        model = compute.pool().get(run.model)
    assert int(token) in ids and model.tokenizer.convert_ids_to_tokens(int(token)) == text
    assert "sinks / hidden_sink_position most common position" in stored  # not averaged
    assert "#0: When Mary and John" in stored or "#1: Then Alice and Bob" in stored


def test_prompts_of_tasks_and_circuits(runs: Path) -> None:
    model = compute.pool().get(catalog.current().entry("toy-ioi.h5").summary.model)
    with catalog.current().open("toy-ioi.h5") as run:
        ids, source, answer = head_page._resolve_prompt(run, model, "circuit:ioi-toy", 7, None)
        assert source == "circuit ioi-toy's prompt #7" and answer.target is not None
        again = compute.task_prompts(model, "ioi-toy", n=8, seed=0)[7]
        assert ids.tolist() == again.token_ids.tolist()
        with pytest.raises(WorkbenchError, match="has 8 prompts: choose an example number 0 to 7"):
            head_page._resolve_prompt(run, model, "circuit:ioi-toy", 8, None)
        ids, source, answer = head_page._resolve_prompt(run, model, "scan:basic", 1, None)
        assert ids.tolist() == run.token_ids("basic", 1).tolist() and answer is None
        with pytest.raises(WorkbenchError, match="type a prompt"):
            head_page._resolve_prompt(run, model, head_page.TYPED, 0, "  ")


@pytest.mark.parametrize("model_name", ["toy-ioi", "smollm2-135m"])
def test_every_metric_of_every_lab_task_is_defined(model_name: str) -> None:
    for choice in lab_page._tasks(model_name):
        task = lab_page._chosen_task(choice["value"], 4, model_name)
        family = lab_page._family(choice["value"])
        for metric in task.metrics:
            assert (family, metric) in lab_page.METRICS, (choice, metric)
        assert "definitions" in str(lab_page._definitions(choice["value"]))


def test_a_sweep_is_stored_and_drawn_as_a_grid(runs: Path, tmp_path: Path) -> None:
    import pandas as pd

    info = catalog.current().entry("toy-ioi.h5").summary.model
    frame = pd.DataFrame(
        [
            {"layer": la, "head": h, "accuracy": 1.0, "accuracy_diff": -0.1 * (la * 4 + h),
             "accuracy_ci_low": -1.0, "accuracy_ci_high": 0.0}
            for la in range(2) for h in range(4)
        ]
    )  # fmt: skip
    frame.attrs |= {"baseline": {"accuracy": 1.0}, "task": "toy", "kind": "zero"}
    data = lab_page._sweep_record(frame, info) | {"kind": "zero"}
    data = json.loads(json.dumps(data))  # as stored
    view = lab_page._result_view("r", data, info, None)
    (grid,) = [c.figure for c in _graphs(view)]
    np.testing.assert_allclose(np.asarray(grid.data[0].z), [[0, -0.1, -0.2, -0.3],
                                                            [-0.4, -0.5, -0.6, -0.7]])  # fmt: skip
    assert "1.3 -0.7000" in _text(view)  # the head that matters most leads the table


def test_an_evaluation_is_drawn_the_same_fresh_or_stored(runs: Path) -> None:
    from interventions.evaluation import evaluate
    from interventions.specs import spec_from_dict
    from workbench.store import write_intervention_result

    cat = catalog.current()
    info = cat.entry("toy-ioi.h5").summary.model
    model = compute.pool().get(info)
    task = get_task("toy", model_name="toy-ioi", n=8)
    result = evaluate(model, task, spec_from_dict({"kind": "zero", "heads": [[1, 1]]}),
                      n_controls=2)  # fmt: skip
    data = {"mode": "evaluate", **result.to_dict(), "kind": "zero"}
    fresh = lab_page._result_view("x", data, info, None)
    write_intervention_result(cat.resolve("toy-ioi.h5"), "x", json.dumps(data), info)
    stored = json.loads(intervention_results(cat.resolve("toy-ioi.h5"))["x"])
    assert str(lab_page._result_view("x", stored, info, None)) == str(fresh)
    # one figure per metric, each the notebook's EvalResult.plot(metric) bars
    figures = [g.figure for g in _graphs(fresh)]
    assert len(figures) == len(result.metrics)
    for figure, metric in zip(figures, result.metrics, strict=True):
        expected = result.plot(metric)
        assert [list(t.y) for t in figure.data] == [list(t.y) for t in expected.data]
    listed = _text(lab_page._stored(None, "toy-ioi.h5"))
    assert "x" in listed and f"Δ accuracy {result.table.loc['accuracy', 'diff']:+.4f}" in listed


def _graphs(component) -> list:
    from dash import dcc

    if isinstance(component, dcc.Graph):
        return [component]
    children = getattr(component, "children", None) or []
    children = children if isinstance(children, list) else [children]
    return [g for child in children for g in _graphs(child)]


def _find(component, ident: str):
    """The component with id ``ident`` in a Dash tree, or None."""
    if getattr(component, "id", None) == ident:
        return component
    children = getattr(component, "children", None) or []
    for child in children if isinstance(children, list) else [children]:
        found = _find(child, ident)
        if found is not None:
            return found
    return None


def test_a_long_prompt_shows_the_kernels_top_keys_outside_the_window(runs: Path) -> None:
    """Above PATTERN_WINDOW tokens the token view gets exact rows for the window and, for every
    other query, the TOP_KEYS keys the kernels found, largest first; the focused-queries table
    names each of them by its decoded token."""
    model = compute.pool().get(catalog.current().entry("a.h5").summary.model)
    ids = model.tokenize(" ".join([PROMPT_WORDS] * 8))
    n = len(ids)
    assert n > compute.PATTERN_WINDOW
    forward, _ = compute.forwards().get(model, ids, 1, 0)
    ident = {"run": "a.h5", "layer": 1, "head": 2}
    view = head_page._render(ident, "typed", 0, model, forward, 2, "typed text", None, False, 0.1)
    weights = json.loads(_find(view, "head-tokens").to_plotly_json()["props"]["data-weights"])
    assert weights["exact"] == [0, compute.PATTERN_WINDOW]
    positions = forward.positions[2]
    for q in range(compute.PATTERN_WINDOW, n):
        expected = [[k, round(w, 3)] for k, w in positions.attended(q)]
        assert weights["rows"][q] == expected and len(expected) == compute.TOP_KEYS
    assert "4 keys the kernels found each query attends to most" in _text(view)
    table = _text(_find(view, "head-top-queries"))
    labels = token_labels(model, ids)
    q, attended = positions.top_queries(1)[0]
    assert all(labels[k] in table for k, _ in attended) and "key 4" in table
    assert labels[q] in table


def test_the_scan_set_is_every_distinct_prompt_of_the_scan(runs: Path) -> None:
    cat = catalog.current()
    model = compute.pool().get(cat.entry("toy-ioi.h5").summary.model)
    with cat.open("toy-ioi.h5") as run:
        assert run.measurement_names == ["basic", "sinks"]  # both measured the same 2 prompts
        prompts, total = head_page._prompt_set(run, model, head_page.SCAN_SET)
        assert total == 2 and [(p.source, p.item) for p in prompts] == [
            ("scan:basic", 0),
            ("scan:basic", 1),
        ]
        assert [p.token_ids.tolist() for p in prompts] == [
            run.token_ids("basic", i).tolist() for i in range(2)
        ]
        circuit, total = head_page._prompt_set(run, model, "circuit:ioi-toy")
        assert total == 8 and circuit[7].source == "circuit:ioi-toy" and circuit[7].item == 7
        with pytest.raises(WorkbenchError, match="unknown prompt source"):
            head_page._prompt_set(run, model, "nowhere:x")


def test_ranked_positions_name_the_prompt_and_show_the_token_in_context(runs: Path) -> None:
    """The table's rows: the value, a link that opens the prompt on the Head page, the position's
    decoded token in bold between its neighbours, and where that query attends most."""
    cat = catalog.current()
    model = compute.pool().get(cat.entry("a.h5").summary.model)
    with cat.open("a.h5") as run:
        prompts, total = head_page._prompt_set(run, model, head_page.SCAN_SET)
    survey, _ = compute.surveys().get(model, prompts, 1)
    ranked = compute.top_positions(survey, 2, "max_prob", 5)
    ident = {"run": "a.h5", "layer": 1, "head": 2}
    view = head_page._ranked_view(ident, model, survey, ranked, 2, "max_prob", total, False)
    table = _find(view, "head-ranked-table")
    rows = table.children[1].children
    assert len(rows) == 5
    best, prompt = ranked[0], survey.prompts[ranked[0].prompt]
    cells = rows[0].children
    assert _text(cells[1]) == f"{best.value:.4g}"
    link = cells[2].children
    assert link.href == f"/head?run=a.h5&layer=1&head=2&prompt=scan%3Abasic&item={prompt.item}"
    text = token_text(model, prompt.token_ids.numpy())[best.position]
    assert _text(cells[3]) == f"{best.position}:{text}"
    (at,) = [c for c in cells[4].children if getattr(c, "className", "") == "ctx ctx-at"]
    assert at.children == text  # the position's token, in bold among its neighbours
    key, weight = survey.positions[best.prompt][2].attended(best.position)[0]
    assert _text(cells[5]).startswith(f"{key}:") and f"({weight:.3f})" in _text(cells[5])
    assert f"over {len(prompts)} prompts" in _text(view)
