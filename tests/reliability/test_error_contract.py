"""Issue 21's cases, one by one: each gives a clean one-line error (exit code 2) or a correct
result. The generated versions of these inputs are in test_reliability_properties.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from app.catalog import RunCatalog
from interventions.evaluation import evaluate
from interventions.specs import load_specs
from probes import get_probes
from tests.reliability.harness import make_run_file
from workbench import atomic
from workbench.cli import main
from workbench.errors import (
    CorruptFileError,
    DeviceError,
    InterventionError,
    OutputLockedError,
    ProbeOptionError,
    PromptSetError,
    RunFileError,
    UnknownModelError,
    WorkbenchError,
)
from workbench.export import export
from workbench.headmap import HeadMap, Policy
from workbench.models import load
from workbench.scanner import scan
from workbench.store import (
    RUN_SCHEMA,
    RUN_SCHEMA_VERSION,
    SEAL_SIZE,
    RunWriter,
    check_seal,
    open_run,
    partial_path,
    seal,
)
from workbench.tasks import get_task, load_prompts


def _cli(capsys, *argv: str) -> str:
    """Run ``workbench argv``; assert exit code 2 and one stderr line; return that line."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    return make_run_file(tmp_path / "run.h5")


@pytest.fixture(scope="module")
def toy_ioi():
    return load("toy-ioi", device="cpu")


# -- Hang and undetected corruption -----------------------------------------------------------

ENTRY_POINTS = textwrap.dedent(
    """
    import json, sys, time
    from workbench.cli import main
    import workbench.commands  # the handlers' imports (torch...) are startup, not the check
    import workbench as wb
    from app.catalog import RunCatalog
    from pathlib import Path
    path = sys.argv[1]
    def api():
        wb.open_run(path).score("sink")
    def explorer():
        entry = RunCatalog(Path(path).parent).entry(Path(path).name)
        raise SystemExit(2 if "truncated or corrupt" in entry.error else 1)
    for name, call in [
        ("api", api),
        ("show", lambda: sys.exit(main(["show", path]))),
        ("export", lambda: sys.exit(main(["export", path, "--format", "json", "--out",
                                          str(Path(path).parent / "exported")]))),
        ("evaluate-map", lambda: sys.exit(main(["evaluate-map", path, "--model", "toy-bb"]))),
        ("explorer", explorer),
    ]:
        start = time.perf_counter()
        try:
            call()
            outcome = "accepted"
        except SystemExit as e:
            outcome = f"exit {e.code}"
        except Exception as e:
            outcome = type(e).__name__
        print(json.dumps([name, outcome, time.perf_counter() - start]), flush=True)
    """
)


def test_flipped_bytes_give_the_run_file_error_at_every_entry_point_in_under_5_s(run_file):
    """The issue's hang: 4 flipped bytes in a run file. Each entry point (the API, show, export,
    evaluate-map, the explorer's catalog) refuses the file in under 5 s once the program has
    started (imports are not timed); a separate process, so that a hang fails this test
    instead of stalling the suite."""
    data = bytearray(run_file.read_bytes())
    for offset in (SEAL_SIZE + 40, SEAL_SIZE + 700, len(data) // 2, len(data) - 100):
        data[offset] ^= 0x10
    run_file.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", ENTRY_POINTS, str(run_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r[0] for r in rows] == ["api", "show", "export", "evaluate-map", "explorer"], done
    for name, outcome, seconds in rows:
        assert seconds < 5, (name, seconds)
        expected = "CorruptFileError" if name == "api" else "exit 2"
        assert outcome == expected, (name, outcome, done.stderr)
    assert done.stderr.count("truncated or corrupt") == 3  # show, export, evaluate-map
    assert not (run_file.parent / "exported").exists()


def test_every_single_bit_flip_in_the_seal_is_detected(run_file):
    """All 4096 one-bit changes of the 512-byte seal (kind, version, digest, size, newlines,
    padding) give a RunFileError; a newline turned into another line break included."""
    original = run_file.read_bytes()
    for bit in range(SEAL_SIZE * 8):
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        run_file.write_bytes(bytes(data))
        with pytest.raises(RunFileError):
            check_seal(run_file, RUN_SCHEMA, RUN_SCHEMA_VERSION)
    run_file.write_bytes(original)
    check_seal(run_file, RUN_SCHEMA, RUN_SCHEMA_VERSION)


def test_a_flipped_bit_in_a_score_is_detected_not_read_as_data(run_file):
    with open_run(run_file) as run:
        before = run.score("sink").values
    data = bytearray(run_file.read_bytes())
    with h5py.File(run_file, "r") as f:  # where the score's bytes are
        offset = f["scores/sink"].id.get_chunk_info(0).byte_offset
    data[offset + 1] ^= 0x01
    run_file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="does not match the checksum"):
        open_run(run_file)
    assert before.shape == (2, 4)


def test_a_damaged_statistic_in_a_partial_file_is_caught_by_fletcher32(tmp_path):
    """A partial file is not sealed (a rerun resumes it); HDF5's checksum of each chunk of its
    statistics catches a damaged one when the rerun reads them."""
    info = make_run_file(tmp_path / "model.h5")  # only for a model identity
    with open_run(info) as run:
        model = run.model
    writer = RunWriter(tmp_path / "run.h5", model, {})
    items = [{"x": np.full((2, 4), v, np.float32)} for v in (1, 2)]
    writer.measurement("m", ["a", "b"], [np.arange(2)] * 2, {"x": "d"}).write(0, items)
    writer.close()
    partial = partial_path(tmp_path / "run.h5")
    with h5py.File(partial, "r") as f:
        offset = f["measurements/m/stats/x"].id.get_chunk_info(0).byte_offset
    data = bytearray(partial.read_bytes())
    data[offset + 3] ^= 0x40
    partial.write_bytes(bytes(data))
    writer = RunWriter(tmp_path / "run.h5", model, {})
    group = writer.measurement("m", ["a", "b"], [np.arange(2)] * 2, {"x": "d"})
    assert group.n_done == 2  # resumed: the checkpoint's bookkeeping is intact
    with pytest.raises(CorruptFileError, match="delete it and rerun the scan"):
        group.stats()
    writer.close()


def test_a_table_of_the_wrong_shape_is_refused_even_when_sealed(run_file):
    """A 7x7 score table in a 2x4-head model (written behind the workbench's back and sealed
    again, so only the layout check can catch it)."""
    with h5py.File(run_file, "r+") as f:
        del f["scores/sink"]
        f.create_dataset("scores/sink", data=np.zeros((7, 7), np.float32))
        f["scores/sink"].attrs.update(
            {"definition": "d", "threshold": 0.5, "label": "", "parameters": "{}"}
        )
    seal(run_file)
    with pytest.raises(CorruptFileError, match=r"scores/sink is \(7, 7\), not \[n_layers"):
        open_run(run_file)


# -- Tracebacks --------------------------------------------------------------------------------


def test_scan_out_an_existing_directory_is_refused_before_any_work(capsys, tmp_path):
    line = _cli(capsys, "scan", "toy-bb", "--out", str(tmp_path))
    assert "is a directory; give a file path" in line
    assert list(tmp_path.iterdir()) == []  # no .DIR.partial, no lock


@pytest.mark.parametrize("command", ["scan", "cache", "train-toy", "export"])
@pytest.mark.parametrize("where", ["/proc/x.h5", "FILE/x.h5"])
def test_unwritable_or_impossible_outputs_are_refused(capsys, tmp_path, run_file, command, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = where.replace("FILE", str(blocker))
    argv = {
        "scan": ["scan", "toy-bb", "--out", out],
        "cache": ["cache", "toy-bb", "--prompts", "demo", "--hooks", "*", "--out", out],
        "train-toy": ["train-toy", "toy-bb", "--out", out],
        "export": ["export", str(run_file), "--format", "json", "--out", out],
    }[command]
    line = _cli(capsys, *argv)
    assert line.startswith(f"workbench {command}: error: argument --out: cannot write")


def test_non_utf8_prompt_and_spec_files_are_refused(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptSetError, match="is not UTF-8 text"):
        load_prompts(str(prompts))
    spec = tmp_path / "s.json"
    spec.write_bytes(b'{"kind": "zero", "heads": [["\xff"]]}')
    assert "is not UTF-8 text" in _cli(
        capsys, "intervene", "toy-ioi", "--spec", str(spec), "--task", "toy"
    )
    assert "is not UTF-8 text" in _cli(
        capsys,
        "cache",
        "toy-bb",
        "--prompts",
        str(prompts),
        "--hooks",
        "*",
        "--out",
        str(tmp_path / "c.h5"),
    )


def test_devices_that_do_not_exist(capsys):
    assert "expected a device" in _cli(capsys, "scan", "toy-bb", "--device", "nosuch")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device cuda is not available"):
            load("toy-bb", device="cuda")
    with pytest.raises(DeviceError, match="is not a device name"):
        load("toy-bb", device="nosuch")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "RUN", "--scores", ","], "argument --scores: expected comma-separated names"),
        (["app", "--port", "-1"], "argument --port: expected an integer in [1, 65535]"),
        (["ioi", "toy-ioi", "--templates", "abc"], "argument --templates: expected a comma"),
        (
            ["intervene", "toy-ioi", "--spec", "{}", "--task", "toy", "--batch-size", "0"],
            "argument --batch-size: expected an integer >= 1",
        ),
        (["scan", "toy-bb", "--max-tokens", "-5"], "argument --max-tokens: expected an integer"),
        (["scan", "toy-bb", "--max-tokens", "0"], "argument --max-tokens: expected an integer"),
        (["scan", "toy-bb", "--batch-size", "0"], "argument --batch-size: expected an integer"),
        (["scan", "toy-bb", "--probes", ""], "argument --probes: expected comma-separated"),
        (["ioi", "toy-ioi", "--exact-heads", "-1"], "argument --exact-heads: expected an int"),
        (
            ["intervene", "toy-ioi", "--spec", "{}", "--task", "toy", "--controls", "-1"],
            "argument --controls: expected an integer >= 0",
        ),
        (
            ["intervene", "toy-ioi", "--spec", "{}", "--task", "toy", "--top-k", "-2"],
            "argument --top-k: expected an integer >= 1",
        ),
        (
            ["export", "RUN", "--format", "json", "--out", "OUT", "--threshold", "nan"],
            "argument --threshold: expected a finite number",
        ),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(capsys, run_file, tmp_path, argv, message):
    argv = [str(run_file) if a == "RUN" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    line = _cli(capsys, *argv)
    assert line.startswith(f"workbench {argv[0]}: error: {message}"), line


def test_arguments_checked_where_they_meet_the_model(capsys, tmp_path):
    """--templates 999 (one of a few templates) and --task-option n=-5 are refused with one
    line once the task is built."""
    line = _cli(
        capsys,
        "ioi",
        "toy-ioi",
        "--templates",
        "999",
        "--n",
        "2",
        "--quiet",
        "--out",
        str(tmp_path / "c.json"),
    )
    assert "templates must be indices 0..5" in line
    line = _cli(
        capsys,
        "intervene",
        "toy-ioi",
        "--spec",
        '{"kind": "zero", "heads": [[0, 0]]}',
        "--task",
        "ioi",
        "--task-option",
        "n=-5",
    )
    assert "at least one prompt" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe", "cannot read circuit file"),
        (b"[1]", "not a workbench circuit"),
        (b'{"schema": "attention-head-workbench/circuit"}', "schema version"),
    ],
)
def test_a_bad_circuit_to_compare_is_refused_before_the_work(capsys, tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    start = time.perf_counter()
    line = _cli(
        capsys,
        "ioi",
        "toy-ioi",
        "--compare",
        str(bad),
        "--quiet",
        "--out",
        str(tmp_path / "c.json"),
    )
    assert message in line and time.perf_counter() - start < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"kind": ["zero"], "heads": [[0, 0]]}', "unknown intervention kind"),
        ('{"kind": "zero", "heads": [[Infinity, 0]]}', "two integers"),
        ('{"kind": "redistribute", "heads": [[0, 0]], "threshold": "abc"}', "threshold must be"),
        ("[" * 50_000 + "]" * 50_000, "nested 50000 deep"),
        ('{"kind": "zero", "heads": [[' + "7" * 5000 + ", 0]]}", "not valid JSON"),
        ('{"kind": "zero", "heads": [[0.9, 1.9]]}', "two integers"),
        ('{"kind": "zero", "heads": [[true, false]]}', "two integers"),
        (
            '{"kind": "redistribute", "heads": [[0, 0]], "sinks": [0], "exclude_first": "false"}',
            "exclude_first must be true or false",
        ),
        ('{"kind": "zeroo", "heads": [[0, 0]]}', "did you mean 'zero'"),
        ('{"kind": "scale", "heads": [[0, 0]], "factr": 2}', "did you mean 'factor'"),
    ],
)
def test_bad_specs_raise_intervention_error_with_one_line(spec, message):
    with pytest.raises(InterventionError, match=message) as error:
        load_specs(spec)
    assert "\n" not in str(error.value)


def test_evaluate_refuses_what_is_not_an_intervention(toy_ioi):
    task = get_task("toy", kind="metric", model_name="toy-ioi", n=4)
    with pytest.raises(InterventionError, match="interventions are a spec"):
        evaluate(toy_ioi, task, 5)


def test_a_sink_beyond_the_prompt_is_an_error_not_a_silent_no_op(toy_ioi):
    task = get_task("toy", kind="metric", model_name="toy-ioi", n=4)
    spec = {"kind": "redistribute", "heads": [[0, 0]], "sinks": [999]}
    with pytest.raises(InterventionError, match=r"sink positions \[999\] lie outside"):
        evaluate(toy_ioi, task, spec, control=False, n_bootstrap=10)
    inside = evaluate(toy_ioi, task, {**spec, "sinks": [0]}, control=False, n_bootstrap=10)
    assert np.isfinite(inside.table["intervened"]).all()


def test_a_second_writer_of_the_same_out_gets_one_line_naming_the_lock(capsys, tmp_path):
    out = tmp_path / "run.h5"
    with atomic.writer_lock(out) as lock:
        line = _cli(capsys, "scan", "toy-bb", "--out", str(out), "--quiet")
        assert f"is being written by another process (pid {os.getpid()} holds {lock})" in line
    assert list(tmp_path.iterdir()) == []  # the lock goes with its holder
    with atomic.writer_lock(out), pytest.raises(OutputLockedError):
        make_run_file(out)


# -- Silent reinterpretation -------------------------------------------------------------------


def test_api_scan_refuses_what_the_cli_refuses(tmp_path):
    model = load("toy-bb", device="cpu")
    with pytest.raises(ProbeOptionError, match="max_tokens must be a positive"):
        scan(model, "demo", max_tokens=-5, progress=False)
    with pytest.raises(ProbeOptionError, match="batch_size must be a positive"):
        scan(model, "demo", probes="sink", batch_size=0, progress=False)
    with pytest.raises(WorkbenchError, match="no probe named"):
        get_probes("")
    with pytest.raises(WorkbenchError, match="did you mean 'sink'"):
        get_probes("snk")


def test_misspelled_options_are_refused_with_the_closest_name(capsys, tmp_path):
    line = _cli(
        capsys,
        "scan",
        "toy-bb",
        "--probes",
        "positional",
        "--option",
        "positional_prompt=2",
        "--out",
        str(tmp_path / "r.h5"),
        "--quiet",
    )
    assert "option 'positional_prompt' is read by none" in line
    assert "did you mean 'positional_prompts'" in line
    assert list(tmp_path.iterdir()) == []


def test_duo_export_replaces_both_files_or_neither(run_file, tmp_path, monkeypatch):
    with open_run(run_file) as run:
        headmap = HeadMap.from_run(run, Policy(full_label="sink"))
    out = tmp_path / "duo"
    export(headmap, "duo", out, threshold=0.5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.write_text

    def failing(self, text, *args, **kwargs):
        if self.name == "config.json":
            raise OSError(28, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="No space left"):
        export(headmap, "duo", out, threshold=0.1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duo", "run.h5"]  # no temp dir


# -- Offline without HF_HUB_OFFLINE -------------------------------------------------------------


def test_a_hub_name_without_network_fails_fast_with_one_line(tmp_path):
    """``HF_ENDPOINT`` at a closed local port stands in for no network: the scan answers with
    one line, without the hub client's five retries (about 23 s before)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": os.getcwd(),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workbench",
            "scan",
            "no-such-model",
            "--out",
            str(tmp_path / "x.h5"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the Hugging Face hub cannot be reached" in done.stderr
    assert seconds < 60  # the imports take most of it on a busy 2-core machine
    with pytest.raises(UnknownModelError, match="not a Hugging Face hub name"):
        load("no such/model/at all")


def test_the_explorer_lists_a_damaged_run_as_an_error(run_file):
    data = bytearray(run_file.read_bytes())
    data[-10] ^= 0xFF
    run_file.write_bytes(bytes(data))
    entry = RunCatalog(run_file.parent).entry(run_file.name)
    assert not entry.ok and "truncated or corrupt" in entry.error


def test_a_published_file_is_never_resumed_as_a_partial_one(run_file):
    with pytest.raises(RunFileError, match="complete, not a partial file"):
        check_seal(run_file, RUN_SCHEMA, RUN_SCHEMA_VERSION, sealed=False)
    with open_run(run_file) as run:
        assert json.loads(run.circuit("ioi")) == {"heads": []}
