"""The probe API, and the loop that runs probes: measure, checkpoint, score, label, publish.

A probe declares *measurements* (inputs plus a function that turns one input into per-head
statistics) and turns the stored statistics into score tables. Probes that share a measurement
key share its work: ``sink`` and ``entropy`` both read the ``basic`` statistics of the scan's
prompts. A scan (:func:`workbench.scanner.scan`, on one process or over ranks with
:mod:`workbench.distributed`) goes through the steps below, each in one place:

1. :func:`measure` runs a measurement over its items (or one rank's share) in batches;
2. :func:`record` does that into the run file's partial copy, one checkpoint per batch, and
   resumes after the last stored batch when the scan is rerun;
3. :func:`score` asks every probe for its score tables ``[n_layers, n_heads]``;
4. :func:`publish` scores the stored statistics, writes the tables with their intervals, the
   labels they select and the heads they leave tentative (the rule:
   :mod:`workbench.scores`), and publishes the run file atomically.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from workbench.errors import ProbeOptionError
from workbench.models import Model
from workbench.scores import ScoreTable
from workbench.store import MeasurementWriter, RunWriter
from workbench.tasks import PromptSet

Stats = dict[str, np.ndarray]  # statistic name -> [n_items, ...]


@dataclass
class ScanContext:
    """What every probe may read: the model, the scan's prompts and the scan's options."""

    model: Model
    prompts: PromptSet
    max_tokens: int | None = None
    path: str = "auto"  # capture path: "auto", "pattern" or "streamed"
    options: dict[str, Any] = field(default_factory=dict)  # probe-specific, e.g. lengths
    # the option names the probes asked for (:meth:`option`), for :meth:`check_options`
    asked: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not _positive_int(self.max_tokens):
            raise ProbeOptionError(
                f"max_tokens must be a positive number of tokens (or None), got {self.max_tokens!r}"
            )

    def option(self, name: str, default: Any) -> Any:
        """Option ``name`` converted to the type of ``default``: bool, int, float, str, or a tuple
        whose items take the type of the default's first item (str for an empty default).

        A tuple option takes a single value, a comma list or a JSON list, from the CLI
        (``--option retrieval_lengths=1024``, ``=512,1024``, ``=[512,1024]``) and from the API
        (``options={"retrieval_lengths": 1024}``, ``"512,1024"``, ``[512, 1024]``) alike.

        Raises:
            ProbeOptionError: the value does not convert (a float must be finite).
        """
        self.asked.add(name)
        value = self.options.get(name, default)
        kind = type(default[0]) if isinstance(default, tuple) and default else str
        try:
            if isinstance(default, tuple):
                return tuple(_convert(item, kind) for item in _items(value))
            return _convert(value, type(default))
        except (TypeError, ValueError, OverflowError):
            what = (
                f"a single {kind.__name__}, a comma list or a JSON list of them"
                if isinstance(default, tuple)
                else type(default).__name__
            )
            raise ProbeOptionError(
                f"option {name}={value!r}: expected {what} (default {default!r})"
            ) from None

    def check_options(self) -> None:
        """Refuse options that no probe asked for (a misspelled key would otherwise change
        nothing, silently): :class:`ProbeOptionError` names the closest option the probes read.
        Called once every probe has built its measurements (where probes read options)."""
        unknown = sorted(set(self.options) - self.asked)
        if not unknown:
            return
        close = difflib.get_close_matches(unknown[0], sorted(self.asked), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ProbeOptionError(
            f"option {unknown[0]!r} is read by none of this scan's probes{hint}; they read: "
            f"{', '.join(sorted(self.asked)) or 'no options'}"
        )

    def token_ids(self) -> list[np.ndarray]:
        """The scan's prompts tokenized, each ``[seq]``."""
        return [self.model.tokenize(t, self.max_tokens).numpy() for t in self.prompts.texts]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _items(value: Any) -> list[Any]:
    """The items of a list-valued option: a list or tuple as it is, a string as a JSON list when
    it starts with ``[``, else as a comma list; any other single value as a list of one."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(str(e)) from None
            if not isinstance(parsed, list):
                raise ValueError(text)
            return parsed
        return [item.strip() for item in text.split(",") if item.strip()]
    return [value]


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (bool, int, float or str), refusing what would change its meaning
    (``1.5`` as an int, ``"yes"`` as a bool, a list as a number)."""
    if isinstance(value, list | tuple | dict):
        raise TypeError(value)
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if isinstance(value, bool | int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if kind is int:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not float(number).is_integer():
            raise ValueError(value)
        return int(number)
    if kind is float and isinstance(value, bool):
        raise ValueError(value)
    converted = kind(value.strip() if isinstance(value, str) else value)
    if kind is float and not math.isfinite(converted):
        raise ValueError(value)
    return converted


@dataclass
class Measurement:
    """Inputs and the per-item function whose results the run file stores under ``key``.

    ``measure(i)`` returns ``{statistic: array}`` for item ``i``; each statistic keeps one shape
    across items (usually ``[n_layers, n_heads]``). ``definitions`` documents every statistic.
    """

    key: str
    texts: list[str]
    token_ids: list[np.ndarray]
    definitions: dict[str, str]
    measure: Callable[[int], dict[str, np.ndarray]]


class Probe(Protocol):
    """A head type's detector: the measurements it needs and the score tables it makes of them."""

    name: str

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        """The measurements this probe needs (keys shared with other probes are run once)."""
        ...

    def score(self, stats: dict[str, Stats]) -> list[ScoreTable]:
        """``stats[key][statistic]``: ``[n_items, ...]``; returns ``[n_layers, n_heads]`` tables."""
        ...


def measure(
    m: Measurement,
    *,
    batch_size: int,
    progress: bool,
    items: list[int] | None = None,
    start: int = 0,
    on_batch: Callable[[int, list[Stats]], None] | None = None,
) -> Stats:
    """Measure ``items`` (positions in ``m``; default all) from position ``start`` of that list
    on, in batches of ``batch_size``; returns the items measured here, each statistic stacked
    ``[n_measured, ...]``. ``on_batch(first, batch)`` gets each batch and its first position in
    ``items`` (a run file's checkpoint)."""
    if not _positive_int(batch_size):
        raise ProbeOptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    items = list(range(len(m.texts))) if items is None else items
    collected: list[Stats] = []
    batch: list[Stats] = []
    n = len(items)
    with tqdm(
        total=n, initial=start, desc=m.key, unit="item", disable=not progress, file=sys.stderr
    ) as bar:
        for index in range(start, n):
            batch.append(m.measure(items[index]))
            bar.update(1)
            if len(batch) == batch_size or index == n - 1:
                if on_batch is not None:
                    on_batch(index + 1 - len(batch), batch)
                collected.extend(batch)
                batch = []
    if not collected:
        return {}
    return {name: np.stack([item[name] for item in collected]) for name in collected[0]}


def record(
    writer: RunWriter,
    key: str,
    m: Measurement,
    *,
    batch_size: int,
    progress: bool,
    share: tuple[int, list[int], Path] | None = None,
) -> MeasurementWriter:
    """Measure ``m`` into its group of ``writer``, checkpointing every batch; a group left by a
    stopped scan with the same inputs is resumed after its last stored batch (said on stderr).

    ``share``: ``(rank, items, run file)`` when one rank of a data-parallel scan writes its part
    file: the group holds only ``items`` (positions in ``m``) and their ``item_index``, and the
    resume note names the rank and the run file the parts will make.
    """
    rank, items, run = share or (None, list(range(len(m.texts))), writer.path)
    group = writer.measurement(
        key,
        [m.texts[i] for i in items],
        [m.token_ids[i] for i in items],
        m.definitions,
        item_index=None if share is None else items,
    )
    if 0 < group.n_done < group.n_items:
        who, scope = ("", "") if rank is None else (f"rank {rank}: ", " of this rank")
        print(
            f"{who}resuming {run} ({key}) after item {group.n_done}/{group.n_items}{scope}",
            file=sys.stderr,
        )
    measure(
        m,
        batch_size=batch_size,
        progress=progress,
        items=items,
        start=group.n_done,
        on_batch=group.write,
    )
    return group


def score(probes: list[Probe], stats: dict[str, Stats]) -> dict[str, ScoreTable]:
    """Every probe's score tables by name; ``stats[key][statistic]``: ``[n_items, ...]``."""
    return {table.name: table for probe in probes for table in probe.score(stats)}


def publish(
    writer: RunWriter, groups: dict[str, MeasurementWriter], probes: list[Probe]
) -> tuple[dict[str, ScoreTable], Path]:
    """Score the statistics stored in ``groups`` (every item done), write the tables and the
    labels they select (:attr:`ScoreTable.selected`, the rest :attr:`ScoreTable.tentative`),
    and publish ``writer``'s run file atomically.
    Returns the tables and the published path; the caller closes ``writer``."""
    tables = score(probes, {key: group.stats() for key, group in groups.items()})
    for table in tables.values():
        writer.write_score(table)
        if table.label:
            writer.write_label(table.label, table.selected, table.rule, table.tentative)
    return tables, writer.finish()
