"""Score tables: one number per (layer, head), with the definition that produced it and how sure
it is.

A probe measures every item (a prompt, a needle trial, a domain text) and stores per-item values
``[n_items, n_layers, n_heads]``; its score is their mean over the items with a finite value (a
needle trial the model failed is NaN and does not count). :meth:`ScoreTable.from_items` builds
the table from those values together with its :class:`Interval`: a percentile bootstrap over the
items (items resampled with replacement, :data:`RESAMPLES` times, seeded), per head, and the
number of items behind each head's score.

Label rule (one place): a head gets the table's ``label`` when the *lower* bound of its interval
exceeds the threshold (:attr:`ScoreTable.selected`); a head whose score exceeds the threshold but
whose lower bound does not is *tentative* (:attr:`ScoreTable.tentative`). A head scored on fewer
than two items has no interval (NaN) and is at most tentative. A table without an interval (a run
file written before intervals existed, a HeadMap JSON) labels by the score itself.

:func:`bootstrap` is the one bootstrap of the workbench: the interventions' confidence intervals
(:mod:`interventions.evaluation`) use it too.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import ShapeError

CONFIDENCE = 0.95  # two-sided coverage of every interval
RESAMPLES = 1000  # bootstrap resamples
MIN_ITEMS = 2  # an interval needs at least two items

# combine(means): the score from the per-group means, elementwise over any leading axes
Combine = Callable[[list[np.ndarray]], np.ndarray]


def resampled_means(per_item: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """``[resamples, ...]``: means of ``per_item [n, ...]`` over bootstrap resamples of its
    items, NaN items left out of each mean (NaN where a resample holds no finite item).

    The draws are ``rng.integers(0, n, (resamples, n))``; the means are taken as resample counts
    times values, so that memory grows with ``resamples x n + resamples x ...``, not their
    product."""
    x = np.asarray(per_item, dtype=np.float64)
    n, shape = x.shape[0], x.shape[1:]
    flat = x.reshape(n, -1)  # [n, cells]
    finite = np.isfinite(flat)
    index = rng.integers(0, n, size=(resamples, n))
    rows = np.arange(resamples)[:, None] * n
    counts = np.bincount((index + rows).ravel(), minlength=resamples * n).reshape(resamples, n)
    total = counts @ np.where(finite, flat, 0.0)  # [resamples, cells]
    seen = counts @ finite.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = total / seen
    return means.reshape(resamples, *shape)


def item_means(per_item: np.ndarray) -> np.ndarray:
    """``[...]`` mean of ``per_item [n, ...]`` over the items with a finite value (NaN if none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": no finite item
        return np.nanmean(np.asarray(per_item, dtype=np.float64), axis=0)


def bootstrap(
    per_item: np.ndarray | Sequence[np.ndarray],
    combine: Combine | None = None,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval ``(low, high)``, each ``[...]``, of the mean of
    ``per_item [n, ...]`` over its items.

    Several groups (a sequence of arrays ``[n_g, ...]``, e.g. one per input domain) are resampled
    independently and ``combine`` turns their resampled means (a list of ``[resamples, ...]``)
    into the statistic; it must work elementwise so that it also takes the plain means. Cells
    with fewer than :data:`MIN_ITEMS` finite items in a group get NaN bounds: one item says
    nothing about the spread.

    >>> low, high = bootstrap(np.array([1.0, 2.0, 3.0, 4.0]))
    >>> bool(1.0 <= low < 2.5 < high <= 4.0)
    True
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    groups = [per_item] if isinstance(per_item, np.ndarray) else list(per_item)
    shape = (
        np.shape(item_means(groups[0]))
        if combine is None
        else np.shape(combine([item_means(g) for g in groups]))
    )
    n = trial_counts(groups)
    if resamples < 1 or not (n >= MIN_ITEMS).any():
        nan = np.full(shape, np.nan)
        return nan, nan.copy()
    rng = np.random.default_rng(seed)
    means = [resampled_means(g, rng, resamples) for g in groups]
    statistic = means[0] if combine is None else combine(means)  # [resamples, ...]
    tail = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        low, high = np.nanquantile(statistic, [tail, 1 - tail], axis=0)
    enough = n >= MIN_ITEMS
    return np.where(enough, low, np.nan), np.where(enough, high, np.nan)


def trial_counts(groups: Sequence[np.ndarray]) -> np.ndarray:
    """``[...]`` int: per cell, the fewest finite items any group holds (one group: its count)."""
    counts = [np.isfinite(np.asarray(g, dtype=np.float64)).sum(axis=0) for g in groups]
    return np.minimum.reduce(counts) if len(counts) > 1 else counts[0]


@dataclass(frozen=True)
class Interval:
    """How sure a score table is, per head: the bootstrap bounds of each score and the number
    of items (prompts, trials) behind it."""

    low: np.ndarray  # [n_layers, n_heads] float32, NaN: fewer than MIN_ITEMS items
    high: np.ndarray  # [n_layers, n_heads] float32
    n_trials: np.ndarray  # [n_layers, n_heads] int32: items with a finite value
    confidence: float = CONFIDENCE
    resamples: int = RESAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "low", np.asarray(self.low, dtype=np.float32))
        object.__setattr__(self, "high", np.asarray(self.high, dtype=np.float32))
        object.__setattr__(self, "n_trials", np.asarray(self.n_trials, dtype=np.int32))
        shapes = {self.low.shape, self.high.shape, self.n_trials.shape}
        if len(shapes) != 1:
            raise ShapeError(f"interval bounds and trial counts differ in shape: {shapes}")

    def attrs(self) -> dict[str, Any]:
        """Metadata as HDF5-storable attributes."""
        return {
            "method": "percentile bootstrap over items (NaN items left out)",
            "confidence": self.confidence,
            "resamples": self.resamples,
            "seed": self.seed,
        }


@dataclass
class ScoreTable:
    """A probe's result: ``values`` is ``[n_layers, n_heads]`` float32.

    ``threshold`` (if any) is the value a head's lower interval bound must exceed to get
    ``label`` (see the module docstring); ``definition`` says in one sentence what the number is
    and cites its source; ``parameters`` are the knobs used; ``interval`` says how sure each
    score is (``None`` for a table built without per-item values).
    """

    name: str
    values: np.ndarray  # [n_layers, n_heads]
    definition: str
    threshold: float | None = None
    label: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    interval: Interval | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.values.ndim != 2:
            raise ShapeError(
                f"score table {self.name!r} must be [n_layers, n_heads], got {self.values.shape}"
            )
        if self.interval is not None and self.interval.low.shape != self.values.shape:
            raise ShapeError(
                f"score table {self.name!r}: interval {self.interval.low.shape} does not match "
                f"the values {self.values.shape}"
            )

    @classmethod
    def from_items(
        cls,
        name: str,
        per_item: np.ndarray | Sequence[np.ndarray],
        definition: str,
        threshold: float | None = None,
        label: str | None = None,
        parameters: dict[str, Any] | None = None,
        *,
        combine: Combine | None = None,
        seed: int = 0,
    ) -> ScoreTable:
        """The table of the mean of ``per_item [n_items, n_layers, n_heads]`` over its finite
        items, with its bootstrap :class:`Interval`. With several groups (a list of arrays) and
        ``combine``, the score is ``combine`` of the group means (see :func:`bootstrap`)."""
        groups = [per_item] if isinstance(per_item, np.ndarray) else list(per_item)
        means = [item_means(g) for g in groups]
        values = means[0] if combine is None else combine(means)
        low, high = bootstrap(groups, combine, seed=seed)
        interval = Interval(low, high, trial_counts(groups), seed=seed)
        return cls(name, values, definition, threshold, label, dict(parameters or {}), interval)

    @property
    def above(self) -> np.ndarray:
        """``[n_layers, n_heads]`` bool: heads whose score is strictly above the threshold."""
        if self.threshold is None:
            return np.zeros(self.values.shape, dtype=bool)
        return self.values > self.threshold

    @property
    def selected(self) -> np.ndarray:
        """``[n_layers, n_heads]`` bool: the labelled heads, whose lower interval bound is
        strictly above the threshold (the score itself for a table without an interval)."""
        if self.threshold is None or self.interval is None:
            return self.above
        with np.errstate(invalid="ignore"):
            return self.interval.low > self.threshold

    @property
    def tentative(self) -> np.ndarray:
        """``[n_layers, n_heads]`` bool: heads above the threshold that are not labelled because
        their interval reaches down to it (or they have no interval)."""
        return self.above & ~self.selected

    @property
    def layer_values(self) -> np.ndarray | None:
        """``[n_layers]``: the score of each layer when the table holds a per-layer quantity
        repeated over the heads (every head of each layer has the same score, NaN equal to NaN,
        as ``residual_peak``'s residual-stream ratio), else ``None``.

        Decided from the values, so it holds for run files of any age. A table with one head
        per layer, or with no finite score at all, is not treated as per-layer.

        >>> ScoreTable("peak", np.array([[2.0, 2.0], [5.0, 5.0]]), "d").layer_values
        array([2., 5.], dtype=float32)
        >>> ScoreTable("sink", np.array([[0.1, 0.2], [0.5, 0.5]]), "d").layer_values is None
        True
        """
        values = self.values
        if values.shape[1] < 2 or not np.isfinite(values).any():
            return None
        first = np.broadcast_to(values[:, :1], values.shape)
        return values[:, 0].copy() if np.array_equal(values, first, equal_nan=True) else None

    @property
    def rule(self) -> str:
        """The label rule in words, as the run file's ``labels/<label>`` records it."""
        if self.interval is None:
            return f"{self.name} > {self.threshold}"
        pct = round(100 * self.interval.confidence)
        return f"lower {pct}% bootstrap bound of {self.name} > {self.threshold}"

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per head with columns layer, head, score, and with an interval
        ``<score>_low``, ``<score>_high`` and ``<score>_trials``."""
        layers, heads = np.indices(self.values.shape)
        frame = pd.DataFrame(
            {"layer": layers.ravel(), "head": heads.ravel(), self.name: self.values.ravel()}
        )
        if self.interval is not None:
            frame[f"{self.name}_low"] = self.interval.low.ravel()
            frame[f"{self.name}_high"] = self.interval.high.ravel()
            frame[f"{self.name}_trials"] = self.interval.n_trials.ravel()
        return frame

    def attrs(self) -> dict[str, Any]:
        """Metadata as HDF5-storable attributes."""
        return {
            "definition": self.definition,
            "threshold": np.nan if self.threshold is None else float(self.threshold),
            "label": self.label or "",
            "parameters": json.dumps(self.parameters, sort_keys=True),
        }

    @classmethod
    def from_attrs(
        cls, name: str, values: np.ndarray, attrs: Any, interval: Interval | None = None
    ) -> ScoreTable:
        """The table stored as ``values`` with :meth:`attrs` (and its interval, if stored)."""
        threshold = float(attrs["threshold"])
        return cls(
            name=name,
            values=values,
            definition=str(attrs["definition"]),
            threshold=None if np.isnan(threshold) else threshold,
            label=str(attrs["label"]) or None,
            parameters=json.loads(attrs["parameters"]),
            interval=interval,
        )
