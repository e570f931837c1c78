"""Property tests of the error contract (docs/reliability.md), on generated inputs.

Each property draws its inputs from tests/reliability/generators.py through hypothesis
(derandomized: the same inputs every run, so a failure reproduces) and runs them in a worker
process with a time limit (tests/reliability/harness.py). Every outcome must be a clean error
(the contract's exception, or exit code 2 with one stderr line and nothing left behind) or a
correct result; a traceback, a hang, an invalid input accepted or a wrong result fails.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability import generators
from tests.reliability.harness import Worker, classify, make_run_file, read_everything
from workbench.store import open_run

RANDOMS = st.randoms(use_true_random=False)
SETTINGS = {
    "derandomize": True,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def fixtures(workdir: Path) -> dict[str, str]:
    runs = workdir / "fixtures"
    runs.mkdir()
    (runs / "a-file").write_text("x")
    (runs / "a-dir").mkdir()
    (runs / "prompts.txt").write_text("one\n\ntwo\n")
    return {
        "synthetic": str(make_run_file(runs / "synthetic.h5", seed=1)),
        "other": str(make_run_file(runs / "other.h5", seed=2)),
        "MODEL": str(workdir / "no-model-here"),
        "RUN": str(runs / "synthetic.h5"),
        "DIR": str(runs / "a-dir"),
        "FILE": str(runs / "a-file"),
        "OUTDIR": str(workdir / "out-dir"),
        "OUTFILE": str(workdir / "out.h5"),
        "PROMPTS": str(runs / "prompts.txt"),
        "SPEC": '{"kind": "zero", "heads": [[0, 0]]}',
    }


@pytest.fixture(scope="module")
def worker(workdir: Path, fixtures: dict[str, str]) -> Worker:
    worker = Worker(workdir, {"RELIABILITY_GOOD_RUN": fixtures["synthetic"]})
    worker.warm("spec", generators.Case({"kind": "zero", "heads": [[0, 0]]}, True))
    yield worker
    worker.close()


def _check(worker: Worker, family: str, case: generators.Case, good: object = None) -> None:
    result = worker.run(family, case)
    category = classify(family, case, result, good)
    assert category in ("clean error", "correct"), (category, case.defect, case.value, result)


@settings(max_examples=150, **SETTINGS)
@given(rng=RANDOMS)
def test_bad_command_lines_exit_2_with_one_line_and_leave_nothing(worker, fixtures, rng):
    case = generators.cli_case(rng)
    case.extra["placeholders"] = fixtures
    _check(worker, "cli", case)


@settings(max_examples=1000, **SETTINGS)
@given(rng=RANDOMS)
def test_specs_through_the_api_give_an_intervention_error_or_a_checked_result(worker, rng):
    """1000 generated specs (2 in 5 valid) loaded and run on toy-ioi: valid ones give finite
    logits of the right shape (equal to the clean run for identity specs, to scaling by 0 for
    zero ablation); every defect raises InterventionError."""
    _check(worker, "spec", generators.spec_case(rng))


@settings(max_examples=100, **SETTINGS)
@given(rng=RANDOMS)
def test_spec_texts_that_are_no_spec_raise_intervention_error(worker, rng):
    _check(worker, "spec text", generators.raw_spec_text_case(rng))


@settings(max_examples=200, **SETTINGS)
@given(rng=RANDOMS)
def test_damaged_run_files_raise_run_file_error_within_5_s(worker, fixtures, rng):
    """Truncations, bit flips in the seal, the metadata and the data, overwritten spans,
    appended bytes, another file's seal, foreign HDF5 (with and without a forged seal): opening
    and reading everything raises RunFileError within 5 s (the worker's limit for this family);
    the unchanged file reads back exactly."""
    good, other = (Path(fixtures[k]).read_bytes() for k in ("synthetic", "other"))
    case = generators.corruption(rng, good, other)
    _check(worker, "corruption", case, read_everything(Path(fixtures["synthetic"])))


@settings(max_examples=100, **SETTINGS)
@given(rng=RANDOMS)
def test_prompt_files_give_their_prompts_or_a_prompt_set_error(worker, rng):
    _check(worker, "prompts", generators.prompt_file_case(rng))


@settings(max_examples=50, **SETTINGS)
@given(rng=RANDOMS)
def test_options_no_probe_reads_are_refused(worker, rng):
    _check(worker, "options", generators.option_case(rng))


# ---------------------------------------------------------------------------------------------
# Kill and resume

KILLER = textwrap.dedent(
    """
    # SIGKILL this scan at its KILL_AT-th event: a measured item, a dataset or attribute write,
    # a flush, the seal, the rename.
    import os, signal, sys
    import h5py
    import probes.basic
    import workbench.store as store

    count, kill_at = [0], int(os.environ["KILL_AT"])

    def event(function):
        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapped

    probes.basic.head_statistics = event(probes.basic.head_statistics)
    h5py.File.flush = event(h5py.File.flush)
    h5py.Dataset.__setitem__ = event(h5py.Dataset.__setitem__)
    h5py.AttributeManager.__setitem__ = event(h5py.AttributeManager.__setitem__)
    store.seal = event(store.seal)
    store.os.replace = event(os.replace)
    from workbench.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _scan(model_dir: Path, prompts: Path, out: Path, kill_at: int | None = None) -> int:
    args = [
        "scan",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--probes",
        "sink",
        "--batch-size",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "KILL_AT": str(kill_at or 0)}
    command = [sys.executable, "-c", KILLER] if kill_at else [sys.executable, "-m", "workbench"]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, workdir) -> tuple[Path, Path]:
    prompts = workdir / "kill-prompts.jsonl"
    prompts.write_text(
        "".join(f'{{"text": "the cat sat on the mat {"and " * i}"}}\n' for i in range(5))
    )
    out = workdir / "uninterrupted.h5"
    assert _scan(tiny_llama_dir, prompts, out) == 0
    return prompts, out


@pytest.mark.slow
@settings(max_examples=4, **SETTINGS)
@given(kills=st.lists(st.integers(1, 40), min_size=1, max_size=3))
def test_a_scan_killed_at_random_points_resumes_to_the_uninterrupted_result(
    tiny_llama_dir, uninterrupted, workdir, kills
):
    """SIGKILL at generated events (an item measured, a dataset or attribute written, a flush,
    the seal, the rename), each kill followed by a rerun that may be killed in turn; the last
    rerun runs to the end. The run file equals the uninterrupted scan's, table for table, and
    no partial or lock file is left."""
    prompts, reference = uninterrupted
    out = workdir / f"killed-{random.Random(str(kills)).randrange(10**9)}" / "run.h5"
    for kill_at in kills:
        _scan(tiny_llama_dir, prompts, out, kill_at)
    assert _scan(tiny_llama_dir, prompts, out) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.h5", "run.html"]
    with open_run(out) as a, open_run(reference) as b:
        assert a.score_names == b.score_names and a.label_names == b.label_names
        for name in a.score_names:
            np.testing.assert_allclose(a.score(name).values, b.score(name).values, atol=1e-6)
        for name in a.label_names:
            assert (a.label(name) == b.label(name)).all()
        for stat in b.stat_names("basic"):
            np.testing.assert_allclose(a.stat("basic", stat), b.stat("basic", stat), atol=1e-6)
