"""benchmarks/smollm2_long.py: the GPU script for SmolLM2 at long context, run here on the CPU.

The slow test runs every stage end to end on the built-in SmolLM2 at 192 tokens (kvpress in the
environment ``tests/clients/test_kvpress.py`` builds), and checks the results JSON against the
run files and the exports it made, and the tables the docs writer puts into copies of the docs
pages. The fast tests hold the docs writer's placement, the JSON conversion and the command
line's one-line errors, with generated inputs.
"""

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import smollm2_long as bench
from tests.clients.test_kvpress import kvpress_python
from workbench.errors import WorkbenchError
from workbench.store import open_run

ROOT = Path(__file__).resolve().parents[2]
LENGTH = 192  # tokens: the needle, the question and a haystack around them
TINY = [
    "--device", "cpu", "--lengths", str(LENGTH), "--map-lengths", str(LENGTH), "--depths", "1",
    "--test-depths", "0.5", "--needles", "1", "--seeds", "1", "--ks", "2",
    "--full-fractions", "0.25", "--max-new", "20", "--recent-size", "32",
]  # fmt: skip


def docs_copy(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in ("export.md", "probes.md"):
        shutil.copy(ROOT / "docs" / page, docs / page)
    return docs


def outside(text: str, name: str) -> str:
    """``text`` without the block ``name`` (if any), whitespace left out."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text:
        text = text[: text.index(start)] + text[text.index(end) + len(end) :]
    return "".join(text.split())


@pytest.mark.slow
def test_every_stage_runs_on_the_cpu_and_the_docs_get_the_tables(tmp_path):
    docs = docs_copy(tmp_path)
    before = {page: (docs / page).read_text() for page in ("export.md", "probes.md")}
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [*TINY, "--out", str(out), "--work", str(work), "--docs", "--docs-dir", str(docs),
            "--kvpress-python", str(kvpress_python())]  # fmt: skip
    assert bench.main(argv) == 0
    (path,) = out.glob("smollm2-long-*.json")
    document = json.loads(path.read_text())
    assert document["command"] == "python -m benchmarks.smollm2_long " + " ".join(argv)
    assert document["settings"]["lengths"] == [LENGTH]

    # retrieval: the JSON holds the run file's own table; the trials are the grid asked for
    row = document["retrieval"]["by_length"][str(LENGTH)]
    with open_run(work / f"retrieval-{LENGTH}.h5") as run:
        table = run.score("retrieval")
    np.testing.assert_allclose(np.array(row["scores"], float), table.values, rtol=1e-6)
    assert row["trials"] == 1 and row["heads"] == 270 and sum(row["distribution"]["heads"]) == 270
    assert [t["score"] for t in row["top"]] == sorted(
        (t["score"] for t in row["top"]), reverse=True
    )
    assert document["map_from_lengths"] == [LENGTH]

    # the maps, and each stage's units
    maps = document["maps"]
    assert maps and all(m["full_kv_heads"] == np.sum(m["kv_full"]) for m in maps.values())
    (curve,) = document["causal"].values()
    assert curve["rows"][0]["k"] == 2 and curve["trials"] == 1
    units = document["evaluate_map"]
    assert sorted(u["prefill"] for u in units.values()) == ["exact", "streamed"]
    for unit in units.values():
        rows = {r["policy"]: r for r in unit["rows"]}
        assert rows["full"]["kv_kept"] == 1.0 and rows["streaming only"]["full_kv_heads"] == 0
        for name, m in maps.items():
            assert rows[name]["full_kv_heads"] == m["full_kv_heads"]
            assert rows[f"random ({m['full_kv_heads']} KV heads, seed 0)"]["kind"] == "random"
    kvpress = document["kvpress"]["by_length"][str(LENGTH)]
    assert kvpress["status"] == "ok", kvpress.get("reason")
    served = {r["map"]: r for r in kvpress["rows"]}
    first = next(iter(maps))  # --kvpress-maps 1: the first map and its random map
    assert set(served) == {
        "none",
        first,
        f"random ({maps[first]['full_kv_heads']} KV heads, seed 0)",
    }
    assert all(r["mask_is_the_map"] for r in served.values() if r["kind"] != "none")
    assert served["none"]["answered"] == 1  # the unpressed model finds this needle
    (run,) = document["runs"]
    assert list(run["stages"]) == list(bench.STAGES)
    assert run["stages"]["retrieval"]["forwards"]["decode_steps"] > 0
    assert run["stages"]["evaluate-map"]["forwards"]["prefill_calls"] > 0

    # the docs: a block after each anchor section, the rest of each page as it was
    for page, name, header in (
        ("probes.md", bench.PROBES_BLOCK, "| length | trials counted |"),
        ("export.md", bench.EXPORT_BLOCK, "| length | prefill | policy |"),
    ):
        text = (docs / page).read_text()
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        block = text[text.index(start) : text.index(end) + len(end)]
        assert outside(text, name) == outside(before[page], name)
        assert header in block and document["command"] in block and "CPU" in block
    export_page = (docs / "export.md").read_text()
    assert "| no press |" in export_page and "| yes |" in export_page
    written = {p: (docs / p).read_text() for p in ("export.md", "probes.md")}
    assert bench.main(["--report", str(path), "--docs-dir", str(docs)]) == 0  # same tables again
    assert {p: (docs / p).read_text() for p in written} == written

    # the same command again: every unit is in the results file already, none runs again
    assert bench.main(argv) == 0
    again = json.loads(path.read_text())
    assert len(again["runs"]) == 2 and not again.get("failed")
    for stage in again["runs"][1]["stages"].values():
        assert not any(stage["forwards"].values())
    assert again["evaluate_map"] == document["evaluate_map"]
    assert again["kvpress"]["by_length"] == document["kvpress"]["by_length"]


# ---------------------------------------------------------------------------------------------
# The docs writer's placement


HEADING = st.sampled_from(["# Title", "## Other", "### Sub", "## Anchor", "#### Deep"])
PARAGRAPH = st.text(alphabet="abc xyz.\n", min_size=0, max_size=30).map(
    lambda t: "\n".join(line for line in t.split("\n") if not line.startswith("#"))
)


@st.composite
def pages(draw):
    """A markdown page with one ``## Anchor`` heading among other headings and paragraphs."""
    before = draw(st.lists(st.tuples(HEADING, PARAGRAPH), max_size=4))
    after = draw(st.lists(st.tuples(HEADING, PARAGRAPH), max_size=4))
    parts = [*before, ("## Anchor", draw(PARAGRAPH)), *after]
    seen = False
    lines = []
    for heading, paragraph in parts:
        if heading == "## Anchor":
            if seen:
                heading = "## Other"
            seen = True
        lines += [heading, paragraph]
    return "\n".join(lines) + "\n"


@settings(max_examples=200, deadline=None)
@given(pages(), st.text(alphabet="qrs |-\n", min_size=1, max_size=40))
def test_a_block_goes_at_the_end_of_the_anchor_section_and_is_replaced_in_place(page, body):
    body = body.strip("\n") or "q"  # place_block writes the body without its outer newlines
    placed = bench.place_block(page, "## Anchor", "b", body)
    start, end = "<!-- b:start -->", "<!-- b:end -->"
    assert placed.count(start) == 1 and placed.count(end) == 1
    lines = placed.split("\n")
    anchor, at = lines.index("## Anchor"), lines.index(start)
    between = [line for line in lines[anchor + 1 : at] if line.startswith("#")]
    assert all(line.startswith("###") for line in between)  # only sub-headings in between
    after = next((line for line in lines[lines.index(end) + 1 :] if line.startswith("#")), None)
    assert after is None or not after.startswith("###")  # the section ended there
    assert "".join(placed.replace(f"{start}\n{body}\n{end}", "").split()) == "".join(page.split())
    again = bench.place_block(placed, "## Anchor", "b", "new body")
    assert again == placed.replace(f"{start}\n{body}\n{end}", f"{start}\nnew body\n{end}")
    assert bench.place_block(again, "## Anchor", "b", "new body") == again


def test_a_page_without_the_anchor_is_refused():
    with pytest.raises(WorkbenchError, match="no heading '## Anchor'"):
        bench.place_block("# Title\ntext\n", "## Anchor", "b", "body")


# ---------------------------------------------------------------------------------------------
# JSON and the command line


LEAVES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**40), 2**40),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
)


@given(
    st.recursive(
        LEAVES,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.text(max_size=4), inner, max_size=4),
            st.lists(st.floats(allow_nan=True), max_size=5).map(np.array),
        ),
        max_leaves=20,
    )
)
def test_results_are_strict_json_with_the_finite_values_kept(value):
    plain = bench.jsonable(value)
    assert json.loads(json.dumps(plain, allow_nan=False)) == plain

    def same(a, b):
        if isinstance(a, dict):
            return all(same(a[k], b[str(k)]) for k in a)
        if isinstance(a, list | tuple | np.ndarray):
            return all(same(x, y) for x, y in zip(list(a), b, strict=True))
        if isinstance(a, float) and not math.isfinite(a):
            return b is None
        return a == b

    assert same(value, plain)


# per option: the parsed value must satisfy this, else the parser must refuse the text
ACCEPTS = {
    "--lengths": lambda v: all(isinstance(n, int) and n >= 128 for n in v),
    "--seeds": lambda v: isinstance(v, int) and 1 <= v <= 100,
    "--max-new": lambda v: isinstance(v, int) and 1 <= v <= 512,
    "--test-depths": lambda v: all(0 <= d <= 1 for d in v),
    "--full-fractions": lambda v: all(0 <= f <= 1 for f in v),
    "--time-limit": lambda v: math.isfinite(v) and v >= 1,
    "--stages": lambda v: set(v) <= set(bench.STAGES),
    "--device": lambda v: v.split(":")[0] in ("cpu", "cuda", "mps", "xpu", "hpu", "npu", "meta"),
}
VALUES = st.one_of(
    st.text(alphabet="0123456789,.-+e xna", max_size=12),
    st.lists(st.sampled_from([*bench.STAGES, "foo", ""]), max_size=3).map(",".join),
    st.sampled_from(["cpu", "cuda", "cuda:1", "gpu", "cuda:x", "128", "8128,4096", "inf", "nan"]),
)


def parse(flag: str, value: str):
    """(the parsed value, None) or (None, (exit code, stderr))."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = bench.parser().parse_args([f"{flag}={value}"])
        except SystemExit as e:
            return None, (e.code, err.getvalue())
    return getattr(args, flag[2:].replace("-", "_")), None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ACCEPTS)), VALUES)
def test_an_argument_is_taken_in_range_or_refused_in_one_line(flag, value):
    parsed, refused = parse(flag, value)
    if refused is None:
        assert ACCEPTS[flag](parsed), (flag, value, parsed)
    else:
        code, message = refused
        assert code == 2 and message.count("\n") == 1 and flag in message, message


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lengths", "100"), ("--lengths", "2048,x"), ("--seeds", "0"), ("--stages", "retrieval,foo"),
     ("--test-depths", "1.5"), ("--time-limit", "inf"), ("--device", "gpu"),
     ("--gguf", "/no/such/file.gguf"), ("--gguf", str(ROOT / "README.md"))],
)  # fmt: skip
def test_bad_arguments_are_refused(flag, value):
    parsed, refused = parse(flag, value)
    assert parsed is None and refused[0] == 2 and refused[1].count("\n") == 1


def test_later_stages_without_retrieval_trials_are_refused_before_loading(tmp_path, capsys):
    argv = ["--device", "cpu", "--stages", "causal", "--out", str(tmp_path)]
    assert bench.main(argv) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "run the retrieval stage first" in message


def test_errors_before_the_model_are_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.smollm2_long", "--report", str(tmp_path / "x.json")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "benchmarks.smollm2_long: error:" in done.stderr


def test_lengths_that_leave_no_room_to_answer_are_refused(tiny_model):
    context = tiny_model.info.max_context
    settings_ = bench.Settings(lengths=[context - 8], map_lengths=[64], max_new=16, needles=1)
    with pytest.raises(WorkbenchError, match="leave no room for 16 new tokens"):
        bench.check_lengths(settings_, tiny_model)


def test_a_failed_unit_is_recorded_and_the_next_one_runs_until_the_time_limit(tmp_path):
    results = bench.Results(tmp_path / "r.json", tmp_path / "r.log", {}, time_limit=600)

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    results.attempt("evaluate-map 8128 exact", out_of_memory)
    results.attempt("evaluate-map 8128 streamed", lambda: "answered 3/10")
    results.time_limit = 0.0
    results.attempt("kvpress 8128", lambda: pytest.fail("ran past the time limit"))
    document = json.loads((tmp_path / "r.json").read_text())
    assert "RuntimeError: CUDA out of memory" in document["failed"]["evaluate-map 8128 exact"]
    assert document["skipped"] == ["kvpress 8128"]
    log = (tmp_path / "r.log").read_text().splitlines()
    assert [line.split("] ", 1)[1].split(":")[0] for line in log] == [
        "evaluate-map 8128 exact",
        "evaluate-map 8128 streamed",
        "kvpress 8128",
    ]
    assert "answered 3/10" in log[1] and "skipped" in log[2]


def test_a_results_file_of_the_same_settings_is_continued_and_keeps_its_first_command(tmp_path):
    same = bench.Settings(device="cpu", time_limit=60)
    path = tmp_path / "r.json"
    written = {
        "settings": asdict(same) | {"time_limit": 5, "stages": ["retrieval"]},
        "command": "python -m benchmarks.smollm2_long --first",
        "causal": {"2048": {}},
    }
    path.write_text(json.dumps(written))
    document = bench.earlier_results(path, same)
    assert document["causal"] == {"2048": {}}  # run-only settings (time limit, stages) may differ
    assert document["runs"] == [{"command": "python -m benchmarks.smollm2_long --first"}]
    assert bench.earlier_results(path, bench.Settings(device="cpu", needles=3)) == {}
    assert bench.earlier_results(tmp_path / "none.json", same) == {}
