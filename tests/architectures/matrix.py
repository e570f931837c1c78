"""Run the architecture matrix and write docs/architectures.md from its results.

    .venv/bin/python -m tests.architectures.matrix            # all families
    .venv/bin/python -m tests.architectures.matrix -k gemma   # extra arguments go to pytest

Runs ``tests/architectures/test_matrix.py`` under pytest with a JUnit XML report, maps each test
``test_<check>[<family>]`` to a column of the table (:data:`COLUMNS`), and writes one row per
family of :data:`tests.architectures.families.FAMILIES`: ``yes`` where every test of the column
passed, ``refused`` where the family declares the path unsupported (``Family.refuses``) and the
test saw the one-line ``CaptureError``, ``FAIL`` with the failing tests and their first message
line otherwise. Nothing in the table is typed by hand. Exits with pytest's status.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from tests.architectures.families import FAMILIES, SEQ_LEN, WINDOW, Family
from workbench.atomic import atomic_write_text
from workbench.kv_policy import machine

ROOT = Path(__file__).resolve().parents[2]
TESTS = "tests/architectures/test_matrix.py"
DOC = ROOT / "docs" / "architectures.md"


@dataclass(frozen=True)
class Column:
    """A column of the table: the tests that make it and the paths whose refusal it shows."""

    title: str
    tests: tuple[str, ...]
    paths: tuple[str, ...]  # keys of Family.refuses that this column reports
    checks: str  # what a "yes" means, for the legend


COLUMNS: tuple[Column, ...] = (
    Column(
        "pattern path",
        ("test_pattern_statistics", "test_scan_pattern"),
        ("pattern",),
        '`head_statistics(path="pattern")` (TransformerLens patterns) equals the statistics '
        "computed from the model's eager patterns by their documented definitions; `scan` with "
        "the default probes runs",
    ),
    Column(
        "streamed path",
        ("test_streamed_statistics", "test_streamed_logits", "test_scan_streamed"),
        ("streamed",),
        "`StreamedRecorder` statistics equal those of the eager patterns "
        "(`kernels.stats_from_pattern`, 1e-4) and the logits equal the eager logits; the "
        "streamed `scan` gives the pattern path's score tables",
    ),
    Column(
        "interventions",
        ("test_zero_ablation_pattern", "test_zero_ablation_streamed"),
        ("pattern", "streamed"),
        "a zero ablation of two heads (`interventions.intervene`) gives the logits of the same "
        "heads zeroed at the input of the model's own output projection; "
        "`interventions.evaluate` runs with it on each path and the paths give the same "
        "per-example losses",
    ),
    Column(
        "KV policy",
        ("test_kv_policy",),
        ("kv_policy", "streamed"),
        "`workbench.kv_policy.CachePolicy` reproduces the eager logits with every KV head full, "
        "and the family's own eager attention with the evictions added to its mask under a "
        "mixed policy",
    ),
    Column(
        "TL bridge",
        ("test_transformer_lens_bridge",),
        (),
        "`TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)` boots offline "
        "and gives the eager logits and patterns",
    ),
    Column(
        "model info",
        ("test_model_info",),
        (),
        "`workbench.models.from_hf` reads architecture, layers, heads, KV heads and "
        "causal/bidirectional right",
    ),
)


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed", "failed", "error", "skipped" or "missing"
    message: str = ""


def run_pytest(extra: list[str]) -> tuple[int, dict[str, Outcome], float]:
    """Run the matrix tests; returns pytest's status, ``{test id: outcome}`` and the wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "matrix.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            TESTS,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *extra,
        ]
        start = time.perf_counter()
        status = subprocess.call(command, cwd=ROOT)
        wall = time.perf_counter() - start
        outcomes = parse_junit(report) if report.is_file() else {}
    return status, outcomes, wall


def parse_junit(path: Path) -> dict[str, Outcome]:
    """``{"test_x[family]": Outcome}`` from a pytest JUnit XML report."""
    outcomes = {}
    for case in ET.parse(path).iter("testcase"):
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed"}.get(tag, tag)
                message = first_line(node.get("message") or node.text or "")
                break
        outcomes[case.get("name", "")] = Outcome(status, message)
    return outcomes


def first_line(text: str) -> str:
    """The gist of a failure message for a table note: its first non-empty lines (up to three,
    so that ``AssertionError:`` comes with what was compared), at most 200 characters."""
    lines = [part.strip() for part in text.splitlines() if part.strip()][:3]
    line = " / ".join(lines).replace("|", "\\|")
    return line if len(line) <= 200 else line[:197] + "..."


def cell(family: Family, column: Column, outcomes: dict[str, Outcome], notes: list[str]) -> str:
    """The table entry of ``family`` in ``column``; appends footnotes to ``notes``."""
    results = {
        test: outcomes.get(f"{test}[{family.name}]", Outcome("missing")) for test in column.tests
    }
    if all(o.status == "missing" for o in results.values()):
        return "not run"  # deselected (e.g. with -k)
    bad = {test: o for test, o in results.items() if o.status != "passed"}
    if bad:
        notes.append(
            f"{family.name}, {column.title}: "
            + "; ".join(f"`{t}` {o.status}: {o.message}" for t, o in bad.items())
        )
        return f"**FAIL** [{len(notes)}]"
    if column.title == "TL bridge" and not family.tl_bridge:
        notes.append(f"{family.name}: TransformerLens 4.x refuses (no adapter for the class)")
        return f"no adapter [{len(notes)}]"
    refused = [path for path in column.paths if path in family.refuses]
    if not refused:
        return "yes"
    for path in refused:
        notes.append(f"{family.name}, {path} refused (`CaptureError`): {family.refuses[path]}")
    others = [p for p in column.paths if p not in refused and p in ("pattern", "streamed")]
    marks = ",".join(str(len(notes) - i) for i in reversed(range(len(refused))))
    if column.title == "interventions" and others:
        return f"{others[0]} path only [{marks}]"
    return f"refused [{marks}]"


def render(outcomes: dict[str, Outcome], status: int, wall: float, extra: list[str]) -> str:
    notes: list[str] = []
    rows = []
    for family in FAMILIES:
        cells = [cell(family, column, outcomes, notes) for column in COLUMNS]
        rows.append(f"| {family.name} | {family.features} | " + " | ".join(cells) + " |")
    counts = {
        s: sum(o.status == s for o in outcomes.values())
        for s in ("passed", "failed", "error", "skipped")
    }
    command = " ".join([".venv/bin/python -m tests.architectures.matrix", *extra])
    versions = ", ".join(
        f"{p} {version(p)}" for p in ("transformers", "transformer-lens", "tokenizers")
    )
    lines = [
        "# Architecture matrix",
        "",
        "Which transformer families the workbench supports on which path, measured on a tiny "
        "random model per family (2-4 layers, hidden 32, 4 heads with grouped-query attention "
        f"where the family has it, sliding windows and chunks of {WINDOW} tokens, prompts of "
        f"{SEQ_LEN} tokens, fp32, seeded weights). The configurations are in "
        "`tests/architectures/families.py`, the checks in `tests/architectures/test_matrix.py`; "
        "this page is generated from the test results by `tests/architectures/matrix.py`, "
        "not written by hand.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        f"- versions: Python {platform.python_version()}, {versions}",
        f"- generated: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"pytest wall time {wall:.0f} s, exit status {status}; tests: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        "",
        "| family | exercises | " + " | ".join(c.title for c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
        *rows,
        "",
        "**yes**: every check of the column passed. **refused**: the workbench declares the path "
        "unsupported for the family and raises a one-line `CaptureError` instead of giving other "
        "numbers (the test asserts that). **FAIL**: a check failed; the note says which and why.",
        "",
        "What each column checks:",
        "",
        *(
            f"- **{c.title}** ({', '.join(f'`{t}`' for t in c.tests)}): {c.checks}."
            for c in COLUMNS
        ),
        "",
    ]
    if notes:
        lines += ["Notes:", "", *(f"{i}. {note}" for i, note in enumerate(notes, 1)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    status, outcomes, wall = run_pytest(extra)
    atomic_write_text(DOC, render(outcomes, status, wall, extra))
    print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
