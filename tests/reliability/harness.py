"""Runs generated inputs (tests/reliability/generators.py) in a worker process with a time limit,
and sorts each outcome into the categories docs/reliability.md counts.

The worker is a separate process so that a hang (HDF5's C code spinning on a damaged file, which
no Python signal interrupts) is caught by the time limit: the worker is killed and replaced, and
the input counts as a hang. Categories:

* ``clean error``: an invalid input refused with the error the contract names (a
  ``WorkbenchError`` of the family's class; on the command line exit code 2, one stderr line,
  nothing left behind);
* ``correct``: a valid input whose result passes the family's check;
* ``traceback``: any other exception (or exit code), or an error message of several lines;
* ``hang``: no answer within the time limit;
* ``silent``: an invalid input accepted, or a valid input with a wrong result;
* ``refused valid``: a valid input refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from tests.reliability.generators import HEADS, LAYERS, OPTION_NAMES, SEQ, SOURCES, Case

CATEGORIES = ("clean error", "correct", "traceback", "hang", "silent", "refused valid")
EXPECTED_ERROR = {  # family -> the WorkbenchError subclass an invalid input must raise
    "spec": "InterventionError",
    "spec text": "InterventionError",
    "corruption": "RunFileError",
    "prompts": "PromptSetError",
    "options": "ProbeOptionError",
}
TIME_LIMIT = {"corruption": 5.0}  # seconds; the run-file promise
DEFAULT_LIMIT = 60.0


# ---------------------------------------------------------------------------------------------
# Fixtures the runners share (built once, by the parent)


def make_run_file(path: Path, seed: int = 0) -> Path:
    """A sealed run file of a 2 x 4-head model: one measurement with two statistics, two score
    tables (one labelled), a circuit; written through :class:`workbench.store.RunWriter`."""
    from workbench.models import ModelInfo
    from workbench.scores import ScoreTable
    from workbench.store import RunWriter

    info = ModelInfo(
        "toy", "toy", "r", "LlamaForCausalLM", LAYERS, HEADS, 2, 8, 32, True, 64, f"{seed:016x}"
    )
    rng = np.random.default_rng(seed)
    writer = RunWriter(path, info, {"seed": seed})
    definitions = {"entropy": "mean entropy", "first_token_mass": "mean mass on token 0"}
    group = writer.measurement(
        "basic", ["a b", "c d e", "f"], [np.arange(3), np.arange(4), np.arange(2)], definitions
    )
    items = [
        {k: rng.random((LAYERS, HEADS)).astype(np.float32) for k in definitions} for _ in range(3)
    ]
    group.write(0, items)
    writer.write_score(
        ScoreTable("sink", rng.random((LAYERS, HEADS)), "mass", threshold=0.5, label="sink")
    )
    writer.write_score(ScoreTable("entropy", rng.random((LAYERS, HEADS)), "entropy"))
    writer.write_label("sink", rng.random((LAYERS, HEADS)) > 0.5, "sink > 0.5")
    writer._f.create_dataset("circuits/ioi", data='{"heads": []}', dtype=h5py_utf8())
    return writer.finish()


def h5py_utf8() -> Any:
    import h5py

    return h5py.string_dtype("utf-8")


def read_everything(path: Path) -> str:
    """Open a run file and read every table, statistic, label and circuit; a digest of it all."""
    from workbench.store import open_run

    digest = hashlib.sha256()
    with open_run(path) as run:
        for name in run.score_names:
            digest.update(np.ascontiguousarray(run.score(name).values).tobytes())
        for name in run.label_names:
            digest.update(run.label(name).tobytes())
        for m in run.measurement_names:
            for s in run.stat_names(m):
                digest.update(np.ascontiguousarray(run.stat(m, s)).tobytes())
            for i in range(run.n_items(m)):
                digest.update(run.prompt_text(m, i).encode())
                digest.update(run.token_ids(m, i).tobytes())
        for name in run.circuit_names:
            digest.update(run.circuit(name).encode())
        run.scores_frame()
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Runners (in the worker)


class _State:
    """What the runners keep between inputs in one worker."""

    model: Any = None
    tokens: Any = None
    sources: Any = None
    means: Any = None
    clean: Any = None


def _spec_model(state: _State) -> None:
    import torch

    from interventions.engine import intervene
    from workbench.models import load

    if state.model is not None:
        return
    state.model = load("toy-ioi", device="cpu")
    info = state.model.info
    assert (info.n_layers, info.n_heads) == (LAYERS, HEADS)
    vocab = state.model.hf.config.vocab_size
    g = torch.Generator().manual_seed(0)
    state.tokens = torch.randint(vocab, (2, SEQ), generator=g)
    state.sources = {name: torch.randint(vocab, (2, SEQ), generator=g) for name in SOURCES}
    state.means = {layer: torch.zeros(info.n_heads, info.d_head) for layer in range(LAYERS)}
    state.clean = intervene(state.model, state.tokens, [])


def run_spec(value: Any, state: _State) -> dict[str, Any]:
    """Load ``value`` through the API and run it on toy-ioi; the result's checks."""
    import torch

    from interventions.engine import intervene
    from interventions.specs import ScaleOutput, ZeroAblation, load_specs

    _spec_model(state)
    specs = load_specs(value)
    logits = intervene(state.model, state.tokens, specs, sources=state.sources, means=state.means)
    checks = {
        "finite": bool(torch.isfinite(logits).all()),
        "shape": tuple(logits.shape) == tuple(state.clean.shape),
    }
    spec = specs[0]
    same = None
    if (isinstance(spec, ScaleOutput) and spec.factor == 1) or getattr(spec, "beta", None) == 1:
        same = state.clean  # the identity: nothing may change
    elif isinstance(spec, ZeroAblation):  # zero ablation is scaling by 0
        same = intervene(state.model, state.tokens, [ScaleOutput(spec.heads, spec.positions)])
    if same is not None:
        checks["metamorphic"] = bool(torch.allclose(logits, same, atol=1e-5))
    return {"ok": True, "checks": checks}


def run_spec_text(value: Any, state: _State) -> dict[str, Any]:
    from interventions.specs import load_specs

    if isinstance(value, bytes):
        path = Path("spec-case.json")
        path.write_bytes(value)
        value = str(path)
    load_specs(value)
    return {"ok": True, "checks": {}}


def run_corruption(value: Any, state: _State, extra: dict[str, Any]) -> dict[str, Any]:
    path = Path("case.h5")
    if extra.get("kind") == "foreign":
        _foreign_hdf5(path, extra["seed"], extra["with_seal"])
    else:
        path.write_bytes(value)
    return {"ok": True, "digest": read_everything(path)}


def _foreign_hdf5(path: Path, seed: int, with_seal: bool) -> None:
    """An HDF5 file of another program: random groups, datasets and attributes; with a forged
    workbench seal (copied from a real run file) in its user block, or without one."""
    import h5py

    rng = random.Random(seed)
    with h5py.File(path, "w", userblock_size=512 if with_seal else 0) as f:
        for i in range(rng.randint(0, 4)):
            f.create_dataset(f"g{i}/d{rng.randrange(9)}", data=np.arange(rng.randint(0, 50)))
        if rng.random() < 0.5:
            f.attrs["schema"] = "attention-head-workbench/run"
            f.attrs["schema_version"] = 2
            f.attrs["complete"] = True
    if with_seal:
        seal = Path(os.environ["RELIABILITY_GOOD_RUN"]).read_bytes()[:512]
        with open(path, "r+b") as fh:
            fh.write(seal)


def run_prompts(value: bytes, state: _State, extra: dict[str, Any]) -> dict[str, Any]:
    from workbench.tasks import load_prompts

    path = Path(f"prompts{extra['suffix']}")
    path.write_bytes(value)
    return {"ok": True, "texts": list(load_prompts(str(path)).texts)}


def run_options(value: dict[str, Any], state: _State) -> dict[str, Any]:
    from workbench.probe import ScanContext

    ctx = ScanContext(model=None, prompts=None, options=value)  # type: ignore[arg-type]
    for name in OPTION_NAMES:  # what the probes of this scan read
        ctx.option(name, 1)
    ctx.check_options()
    return {"ok": True}


def run_cli(argv: list[str], state: _State, extra: dict[str, Any]) -> dict[str, Any]:
    """``workbench.cli.main(argv)`` in the worker's directory: exit code, stderr, and whether
    any file appeared or vanished."""
    from workbench.cli import main

    fill = extra["placeholders"]
    argv = [fill.get(a, a) if not a.startswith("FILE/") else fill["FILE"] + a[4:] for a in argv]
    before = _listing(Path.cwd()) | _listing(Path(fill["DIR"]).parent)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    after = _listing(Path.cwd()) | _listing(Path(fill["DIR"]).parent)
    return {"ok": True, "exit": code, "stderr": err.getvalue(), "changed": sorted(before ^ after)}


def _listing(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


RUNNERS = {
    "spec": lambda case, state: run_spec(case.value, state),
    "spec text": lambda case, state: run_spec_text(case.value, state),
    "corruption": lambda case, state: run_corruption(case.value, state, case.extra),
    "prompts": lambda case, state: run_prompts(case.value, state, case.extra),
    "options": lambda case, state: run_options(case.value, state),
    "cli": lambda case, state: run_cli(case.value, state, case.extra),
}


def _serve(conn: Any, workdir: str, env: dict[str, str]) -> None:
    """The worker's loop: run each ``(family, case)`` it is sent; send back what happened."""
    os.environ.update(env)
    os.chdir(workdir)
    sys.setrecursionlimit(10_000)
    import workbench.errors as errors

    state = _State()
    conn.send("ready")
    while True:
        family, case = conn.recv()
        start = time.perf_counter()
        try:
            result = RUNNERS[family](case, state)
        except BaseException as e:  # everything is an outcome to sort, a traceback too
            result = {
                "ok": False,
                "error": type(e).__name__,
                "classes": [c.__name__ for c in type(e).__mro__],
                "workbench": isinstance(e, errors.WorkbenchError),
                "message": str(e)[:300],
                "traceback": traceback.format_exc()[-2000:],
            }
        result["seconds"] = time.perf_counter() - start
        conn.send(result)


class Worker:
    """A worker process that runs cases with a time limit, replaced when it hangs."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.process: Any = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, str(self.workdir), self.env), daemon=True
        )
        self.process.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the reliability worker did not start")

    def run(self, family: str, case: Case, limit: float | None = None) -> dict[str, Any] | None:
        """The runner's result, or None when it took longer than ``limit`` seconds (a hang)."""
        limit = limit or TIME_LIMIT.get(family, DEFAULT_LIMIT)
        self.conn.send((family, case))
        if self.conn.poll(limit):
            return self.conn.recv()
        self.process.kill()
        self.process.join()
        self.restarts += 1
        self._start()
        return None

    def warm(self, family: str, case: Case) -> None:
        """Run one case without a time limit that counts (loads what the family needs)."""
        self.run(family, case, limit=600)

    def close(self) -> None:
        self.process.kill()
        self.process.join()


def classify(family: str, case: Case, result: dict[str, Any] | None, good: Any = None) -> str:
    """The category of one outcome (see the module docstring). ``good``: what a valid input's
    result must equal (the run file's digest, the prompt texts)."""
    if result is None:
        return "hang"
    if family == "cli":
        lines = result["stderr"].strip().splitlines() if result.get("ok") else []
        if not result.get("ok") or result["exit"] not in (0, 2):
            return "traceback"
        if result["exit"] == 0:
            return "silent"
        parse_time = lines and re.fullmatch(
            r"workbench( \S+)?: error: .*\(workbench( \S+)? --help\)", lines[0]
        )
        if len(lines) != 1 or result["changed"]:
            return "traceback" if len(lines) != 1 else "silent"
        return "clean error" if parse_time else "silent"
    if not result["ok"]:
        expected = EXPECTED_ERROR[family]
        if not result["workbench"] or expected not in result["classes"]:
            return "traceback"
        if "\n" in result["message"]:
            return "traceback"
        return "refused valid" if case.valid else "clean error"
    if not case.valid:
        return "silent"
    if family == "spec":
        return "correct" if all(result["checks"].values()) else "silent"
    if family == "corruption":
        return "correct" if result["digest"] == good else "silent"
    if family == "prompts":
        return "correct" if result["texts"] == case.extra["texts"] else "silent"
    return "correct"
