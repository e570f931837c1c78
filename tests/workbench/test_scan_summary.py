"""What ``workbench scan`` prints (a compact summary per score, the run file, the HTML figure)
and what ``workbench show`` prints (the grids, or the same summary), checked against the run
file's datasets read directly with h5py, not through the workbench's reader."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.cli import main
from workbench.errors import OutputError
from workbench.models import ModelInfo
from workbench.scanner import ScanResult, figure_path, ranked_heads
from workbench.scores import Interval, ScoreTable

TOP = 5  # heads the summary names per score
BLOCK_START = re.compile(r"^(\w+)(?: \((\d+)(?:-(\d+))? items\))?: ")
HEAD = re.compile(r"(\d+)\.(\d+) \(([-\d.]+|nan)\)")


@pytest.fixture(scope="module")
def scanned(tiny_llama_dir, tmp_path_factory) -> tuple[Path, str]:
    """One CLI scan of the tiny Llama with the default probes: its run file and what it printed."""
    folder = tmp_path_factory.mktemp("scan")
    text = "the cat sat on the mat and the dog ran to the park when mary went to the store"
    words = text.split(" ")
    prompts = folder / "prompts.txt"  # prompts separated by blank lines
    prompts.write_text("\n\n".join(" ".join(words[i:] + words[:i]) for i in range(6)) + "\n")
    out = folder / "run.h5"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["scan", str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out), "--quiet"]
        )
    assert code == 0
    return out, printed.getvalue()


def _run(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def _file_tables(path: Path) -> dict[str, dict]:
    """Each score of the run file as stored: values, label and the label's masks."""
    tables = {}
    with h5py.File(path, "r") as f:
        for name, data in f["scores"].items():
            label = data.attrs["label"]
            label = label.decode() if isinstance(label, bytes) else str(label)
            entry = {"values": data[()].astype(np.float64), "label": label or None}
            if label:
                entry["labelled"] = f[f"labels/{label}"][()].astype(bool)
                entry["tentative"] = f[f"tentative/{label}"][()].astype(bool)
            entry["n_trials"] = f[f"intervals/{name}/n_trials"][()]
            tables[name] = entry
    return tables


def _blocks(text: str) -> dict[str, list[str]]:
    """Score name -> its lines of a summary (blocks are separated by blank lines)."""
    blocks = {}
    for block in text.split("\n\n")[1:]:  # the first is the model's line
        lines = block.strip("\n").split("\n")
        match = BLOCK_START.match(lines[0])
        if match:
            blocks[match.group(1)] = lines
    return blocks


def _close(printed: str, value: float) -> bool:
    """``printed`` is ``value`` rounded to the decimals it shows."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 0.5 * 10.0**-decimals + 1e-6


def _check_heads(line: str, values: np.ndarray, *, highest: bool) -> None:
    """The named heads are the ``TOP`` most extreme finite ones, each with its own score."""
    heads = [(int(a), int(b), s) for a, b, s in HEAD.findall(line)]
    finite = np.isfinite(values)
    assert len(heads) == min(TOP, int(finite.sum()))
    named = np.zeros(values.shape, dtype=bool)
    for layer, head, printed in heads:
        assert _close(printed, values[layer, head]), (line, layer, head)
        named[layer, head] = True
    rest = values[finite & ~named]
    if rest.size:
        shown = values[named]
        assert (shown.min() >= rest.max()) if highest else (shown.max() <= rest.min())


def _check_summary(text: str, path: Path) -> None:
    stored = _file_tables(path)
    blocks = _blocks(text)
    assert sorted(blocks) == sorted(stored)
    for name, table in stored.items():
        lines, values = blocks[name], table["values"]
        text_block = "\n".join(lines)
        fewest, most = int(table["n_trials"].min()), int(table["n_trials"].max())
        items = BLOCK_START.match(lines[0]).groups()[1:]
        assert items == ((str(most), None) if fewest == most else (str(fewest), str(most)))
        if table["label"]:
            found = re.search(
                r"(\d+)/(\d+) heads labelled '(\w+)': .*?; (\d+) tentative", text_block
            )
            assert found, text_block
            assert int(found.group(1)) == table["labelled"].sum()
            assert int(found.group(2)) == values.size and found.group(3) == table["label"]
            assert int(found.group(4)) == table["tentative"].sum()
            per_layer = re.search(r"labelled per layer from layer 0: ([\d |]+)", text_block)
            if table["labelled"].any():
                numbers = [int(n) for n in per_layer.group(1).replace("|", " ").split()]
                assert numbers == table["labelled"].sum(axis=1).tolist()
            else:
                assert per_layer is None
        repeated = values.shape[1] > 1 and np.array_equal(
            values, np.repeat(values[:, :1], values.shape[1], axis=1), equal_nan=True
        )
        if repeated:  # a per-layer quantity: one value per layer, no heads named
            assert "per layer (every head of a layer has this value)" in text_block
            rows = [line for line in lines if re.match(r"^\s+\d+-\d+ ", line)]
            printed = [cell for row in rows for cell in row.split()[1:]]
            assert len(printed) == values.shape[0]
            assert all(_close(p, v) for p, v in zip(printed, values[:, 0], strict=True))
            assert "highest:" not in text_block
            continue
        (highest,) = [line for line in lines if line.startswith("  highest: ")]
        _check_heads(highest, values, highest=True)
        lowest = [line for line in lines if line.startswith("  lowest: ")]
        assert len(lowest) == (0 if table["label"] else 1)
        if lowest:
            _check_heads(lowest[0], values, highest=False)


def test_scan_prints_a_summary_per_score_and_writes_the_figure(scanned):
    out, printed = scanned
    _check_summary(printed, out)
    stored = _file_tables(out)
    assert "residual_peak" in stored  # the default probes include a per-layer quantity
    assert "   H0" not in printed  # no grid
    figure = figure_path(out)
    assert printed.rstrip().endswith(
        f"run file: {out} (the grids: workbench show {out})\nfigure: {figure}"
    )
    page = figure.read_text()
    # self-contained: plotly.js inlined once, no script fetched from elsewhere, a plot per score
    assert page.count("plotly.js v") >= 1 and "<script src=" not in page
    assert page.count("Plotly.newPlot(") == len(stored)
    assert all(f"{name} (" in page for name in stored)
    assert sorted(p.name for p in out.parent.iterdir()) == ["prompts.txt", "run.h5", "run.html"]


def test_show_prints_the_grids_and_on_request_the_summary(scanned, capsys):
    out, _ = scanned
    stored = _file_tables(out)
    _check_summary(_run(capsys, ["show", str(out), "--summary"]), out)
    grids = _run(capsys, ["show", str(out), "--scores", "sink,residual_peak"])
    sink, peak = stored["sink"]["values"], stored["residual_peak"]["values"]
    rows = grids.split("layer    H0")[1].split("\n")[1 : 1 + sink.shape[0]]
    for layer, row in enumerate(rows):
        cells = row.replace("*", " ").split()
        assert int(cells[0]) == layer
        assert all(_close(c, v) for c, v in zip(cells[1:], sink[layer], strict=True))
    column = grids.split("layer    value")[1].split("\n")[1 : 1 + peak.shape[0]]
    assert [len(r.replace("*", " ").split()) for r in column] == [2] * peak.shape[0]
    assert all(
        _close(r.replace("*", " ").split()[1], v) for r, v in zip(column, peak[:, 0], strict=True)
    )
    assert "entropy" not in grids


def test_scan_refuses_a_figure_path_it_cannot_write_before_any_work(
    tiny_llama_dir, tmp_path, capsys
):
    (tmp_path / "run.html").mkdir()
    argv = ["scan", str(tiny_llama_dir), "--prompts", "demo", "--out", str(tmp_path / "run.h5")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"workbench: error: {tmp_path / 'run.html'} is a directory; give a file path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html"]  # no partial run file


@settings(max_examples=40, deadline=None)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))
def test_show_summary_takes_no_value(value):
    """``--summary`` is a switch: ``--summary=VALUE`` is one usage line, exit 2, before any file
    is opened."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stopped:
        main(["show", "no-such-run.h5", f"--summary={value}"])
    assert stopped.value.code == 2
    line = err.getvalue().strip()
    assert "\n" not in line and "argument --summary: ignored explicit argument" in line


def test_figure_path_sits_beside_the_run_file():
    assert figure_path("runs/demo.h5") == Path("runs/demo.html")
    assert figure_path("a/b/run") == Path("a/b/run.html")
    assert figure_path("x.html") == Path("x.html.html")  # never the run file itself


def _info(n_layers: int, n_heads: int) -> ModelInfo:
    return ModelInfo("m", "local", "r", "LlamaForCausalLM", n_layers, n_heads, n_heads,
                     16, 64, True, 100, "0")  # fmt: skip


def test_summary_of_hand_made_tables():
    """Counts, tentative heads, heads without a score and a per-layer quantity, on tables whose
    answers are written out here."""
    values = np.array([[0.9, 0.5, 0.1], [0.45, np.nan, 0.8]])
    low = np.array([[0.7, 0.2, 0.0], [0.1, np.nan, 0.6]])
    interval = Interval(low, low + 0.2, np.array([[4, 4, 4], [4, 0, 4]]))
    sink = ScoreTable("sink", values, "d", threshold=0.3, label="sink", interval=interval)
    peak = ScoreTable("peak", np.array([[2.0] * 3, [150.0] * 3]), "per layer")
    result = ScanResult(_info(2, 3), {"sink": sink, "peak": peak})
    blocks = _blocks(result.summary(top=2))
    assert blocks["sink"] == [
        "sink (0-4 items): d",
        "  2/6 heads labelled 'sink': lower 95% bootstrap bound of sink > 0.3; 2 tentative"
        " (score > 0.3,",
        "    lower bound not)",
        "  labelled per layer from layer 0: 1 1",
        "  1/6 heads without a score (no finite item)",
        "  highest: 0.0 (0.90), 1.2 (0.80)",
    ]
    assert blocks["peak"] == [
        "peak: per layer",
        "  per layer (every head of a layer has this value):",
        "        0-1  2.00   150",
    ]
    grids = result.grids()
    assert "layer    value  (every head of the layer)\n    0     2.00 \n    1   150.00 " in grids


def test_write_html_needs_a_place(tmp_path):
    table = ScoreTable("sink", np.array([[0.1, 0.9]]), "d", threshold=0.5, label="sink")
    result = ScanResult(_info(1, 2), {"sink": table})
    with pytest.raises(OutputError, match="no run file to put the figure beside"):
        result.write_html()
    written = result.write_html(tmp_path / "page.html")
    assert written == tmp_path / "page.html" and written.read_text().count("Plotly.newPlot(") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]  # no temporary left


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.one_of(
            st.floats(-5, 5, allow_nan=False), st.just(float("nan")), st.sampled_from([0.0, 1.0])
        ),
        min_size=1,
        max_size=24,
    ),
    heads=st.integers(1, 4),
    n=st.integers(0, 30),
    highest=st.booleans(),
)
def test_ranked_heads_are_the_most_extreme_finite_heads(data, heads, n, highest):
    """Against a plain sort of (value, layer, head) tuples: the same heads in the same order."""
    layers = max(1, len(data) // heads)
    values = np.resize(np.array(data), (layers, heads))
    cells = [
        (float(v) if highest else -float(v), -layer, -head)
        for (layer, head), v in np.ndenumerate(values)
        if np.isfinite(v)
    ]
    expected = [(-c[1], -c[2]) for c in sorted(cells, reverse=True)][:n]
    assert ranked_heads(values, n, highest=highest) == expected
