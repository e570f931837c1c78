"""The evaluation loop: a task metric with and without interventions.

:func:`evaluate` runs the task's batches once with three kinds of group in the same forward pass
(see :mod:`interventions.engine`): the clean model, the interventions, and matched random
controls: the same specs moved to as many random heads *of the same layers*, drawn (seeded)
from the heads no spec touches. It reports per metric the mean with and without, their
difference with a paired bootstrap confidence interval (examples resampled with replacement,
percentile interval, :func:`workbench.scores.bootstrap`), and the same for the control, so that
"this head matters" is read against "any head of that layer matters this much".

Controls always exist (:func:`matched_control`): where a layer has fewer untouched heads than a
spec uses there (heads that cluster in one layer, as retrieval heads do), the rest are borrowed
from the nearest layers, alternately below and above, so the count per band of layers is kept;
the result says which layers lent heads (:attr:`EvalResult.notes`). Only a model with fewer
untouched heads in all than a spec uses has no control (:class:`NoControlError`). The control is
drawn ``n_controls`` times; the table reports the mean over draws and the spread between them
(``control_draw_sd``, ``control_draw_min``, ``control_draw_max``: of each draw's mean
difference).

:func:`sweep` measures one intervention per head (every head, a list, or the top-k of a probe's
score table), many heads per forward pass. :func:`knockout_curve` knocks out the top-k heads of
a score table together for k = 1, 2, 5, 10, 20 and all labelled heads, each against random
non-labelled heads of equal size (Wu et al. 2024's and DuoAttention's test).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from interventions.engine import Intervener
from interventions.specs import (
    Head,
    Intervention,
    MeanAblation,
    load_specs,
    parse_head,
    spec_from_dict,
)
from workbench.errors import InterventionError
from workbench.figures import effect_bars, knockout_figure
from workbench.models import Model
from workbench.scores import bootstrap
from workbench.tasks import Task, TaskBatch, get_task

__all__ = [
    "KNOCKOUT_KS",
    "EvalResult",
    "KnockoutCurve",
    "NoControlError",
    "bootstrap_ci",
    "evaluate",
    "knockout_curve",
    "matched_control",
    "sweep",
    "top_heads",
]

KNOCKOUT_KS = (1, 2, 5, 10, 20)  # top-k sizes of the knock-out curve (and all labelled heads)


class NoControlError(InterventionError):
    """No random control can match the interventions: the model has fewer untouched heads than a
    spec uses. The message names the API argument that turns the control off; :meth:`for_cli`
    names the command-line flag instead."""

    def __init__(self, reason: str, *, argument: str = "control=False", flag: str = "--controls 0"):
        super().__init__(f"{reason}; pass {argument}")
        self.reason, self.flag = reason, flag

    def for_cli(self) -> str:
        """The message with the command-line flag in place of the API argument."""
        return f"{self.reason}; pass {self.flag}"


def bootstrap_ci(
    values: np.ndarray, *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values [n]`` (:func:`workbench.scores.
    bootstrap`); NaN for fewer than two values."""
    low, high = bootstrap(
        np.asarray(values, dtype=np.float64).ravel(),
        resamples=n_bootstrap,
        confidence=confidence,
        seed=seed,
    )
    return float(low), float(high)


def matched_control(
    specs: Sequence[Intervention],
    n_layers: int,
    n_heads: int,
    rng: np.random.Generator,
    exclude: Iterable[Head] = (),
    notes: list[str] | None = None,
) -> list[Intervention]:
    """The specs moved to random heads: per spec and layer, as many heads of that layer, drawn
    without replacement from the heads that no spec touches and ``exclude`` does not name
    (e.g. every head a probe labels, for a "random non-retrieval heads" control).

    A layer with too few such heads gives what it has and the nearest layers lend the rest
    (distance 1 below, 1 above, 2 below, ...; each lender gives what it can, drawn at random);
    every loan is described in ``notes`` (when given), e.g. ``"layer 16 has 4 untouched heads
    for 6: 2 drawn from layer 15"``.

    Raises:
        NoControlError: the model has fewer untouched heads in all than a spec uses.
    """
    taken = {h for spec in specs for h in spec.heads} | {tuple(h) for h in exclude}
    free = {
        layer: [h for h in range(n_heads) if (layer, h) not in taken] for layer in range(n_layers)
    }
    out = []
    for spec in specs:
        if len(spec.heads) > sum(map(len, free.values())):
            raise NoControlError(
                f"no random control: the model has {sum(map(len, free.values()))} heads that no "
                f"intervention touches or the control excludes, a spec uses {len(spec.heads)}"
            )
        out.append(spec.with_heads(_control_heads(spec, free, rng, notes)))
    return out


def _control_heads(
    spec: Intervention,
    free: dict[int, list[int]],
    rng: np.random.Generator,
    notes: list[str] | None,
) -> list[Head]:
    """One control draw for ``spec`` from the ``free`` heads of each layer (see
    :func:`matched_control`): every layer draws from itself first, so that a loan never takes
    heads a layer needs itself; then the layers that ran short borrow from the nearest ones."""
    left = {layer: list(pool) for layer, pool in free.items()}
    heads: list[Head] = []

    def draw(layer: int, n: int) -> int:
        pool = left[layer]
        drawn = [int(h) for h in rng.choice(pool, size=min(n, len(pool)), replace=False)]
        heads.extend((layer, h) for h in drawn)
        left[layer] = [h for h in pool if h not in drawn]
        return len(drawn)

    own = {layer: draw(layer, len(spec.heads_in(layer))) for layer in spec.layers}
    for layer in spec.layers:
        need = len(spec.heads_in(layer)) - own[layer]
        lent: list[str] = []
        for lender in _nearest(layer, len(free))[1:]:
            if need == 0:
                break
            given = draw(lender, need)
            need -= given
            if given:
                lent.append(f"{given} from layer {lender}")
        if lent and notes is not None:
            notes.append(
                f"layer {layer}: {own[layer]} of its {len(spec.heads_in(layer))} control heads "
                f"drawn there, {', '.join(lent)}"
            )
    return heads


def _nearest(layer: int, n_layers: int) -> list[int]:
    """``layer`` and then the other layers by distance, the lower one first at equal distance."""
    return sorted(range(n_layers), key=lambda other: (abs(other - layer), other))


def _as_task(task: Task | str) -> Task:
    task = get_task(task, kind="metric") if isinstance(task, str) else task
    if not isinstance(task, Task):
        raise InterventionError(
            f"{type(task).__name__} is not a task: it needs name, metrics, batches(), score()"
        )
    return task


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


@torch.no_grad()
def _run_groups(
    model: Model,
    task: Task,
    batches: list[TaskBatch],
    groups: list[list[Intervention]],
    *,
    path: str,
    max_rows: int,
    progress: bool,
) -> list[dict[str, np.ndarray]]:
    """Per group, per metric, the per-example values over all batches."""
    intervener = Intervener(model, max_rows=max_rows)
    mean_layers = {
        lay for g in groups for s in g if isinstance(s, MeanAblation) for lay in s.layers
    }
    means = {}
    if mean_layers:
        means = intervener.mean_outputs([b.tokens for b in batches], mean_layers, path=path)
    values: list[dict[str, list[np.ndarray]]] = [{} for _ in groups]
    for batch in _progress(batches, progress, task.name):
        out = intervener.run(
            batch.tokens, groups, sources=batch.variants, means=means, keep=batch.keep, path=path
        )
        for g in range(len(groups)):
            for name, v in task.score(out.logits[g], batch).items():
                values[g].setdefault(name, []).append(v.detach().float().cpu().numpy())
    order = None
    if all(b.index is not None for b in batches):  # back to the task's example order
        order = np.argsort(np.concatenate([b.index for b in batches]), kind="stable")
    return [
        {name: np.concatenate(parts)[order] if order is not None else np.concatenate(parts)
         for name, parts in group.items()}
        for group in values
    ]  # fmt: skip


@dataclass
class EvalResult:
    """Metric with and without the interventions, and with the matched random control.

    ``table``: one row per metric with ``baseline``, ``intervened``, ``diff`` (intervened −
    baseline, mean over examples) and its ``ci_low``/``ci_high``, and the same for the control
    (``control``, ``control_diff``, ...) and the spread of the control draws' mean differences
    (``control_draw_sd``, ``control_draw_min``, ``control_draw_max``). ``per_example``:
    ``{"baseline"|"intervened"|"control": {metric: [n]}}`` (the control averaged over its
    draws); ``control_draws``: ``{metric: [n_draws, n]}``, each draw's values; ``notes``: the
    layers that lent control heads (:func:`matched_control`).
    """

    task: str
    metrics: tuple[str, ...]
    interventions: list[Intervention]
    controls: list[list[Intervention]]
    per_example: dict[str, dict[str, np.ndarray]]
    confidence: float
    n_bootstrap: int
    seed: int
    control_draws: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        rows = []
        for m in self.metrics:
            base = self.per_example["baseline"][m]
            row: dict[str, Any] = {"metric": m, "baseline": base.mean()}
            for label, key in (("intervened", ""), ("control", "control_")):
                if label not in self.per_example:
                    continue
                value = self.per_example[label][m]
                low, high = bootstrap_ci(value - base, n_bootstrap=self.n_bootstrap,
                                         confidence=self.confidence, seed=self.seed)  # fmt: skip
                row |= {
                    key + ("value" if key else "intervened"): value.mean(),
                    f"{key}diff": (value - base).mean(),
                    f"{key}ci_low": low,
                    f"{key}ci_high": high,
                }
            if m in self.control_draws:  # each draw's mean difference, and their spread
                draws = (self.control_draws[m] - base).mean(axis=1)  # [n_draws]
                row |= {
                    "control_draw_sd": draws.std(ddof=1) if len(draws) > 1 else np.nan,
                    "control_draw_min": draws.min(),
                    "control_draw_max": draws.max(),
                }
            rows.append(row)
        self.table = (
            pd.DataFrame(rows).set_index("metric").rename(columns={"control_value": "control"})
        )

    @property
    def n_examples(self) -> int:
        return len(next(iter(self.per_example["baseline"].values())))

    def summary(self) -> str:
        lines = [
            f"task {self.task}: {self.n_examples} examples; "
            f"interventions: {'; '.join(s.describe() for s in self.interventions)}"
        ]
        if self.controls:
            heads = " | ".join(
                ", ".join(f"{lay}.{h}" for s in c for lay, h in s.heads) for c in self.controls
            )
            lines.append(f"matched random control ({len(self.controls)} draws): {heads}")
            lines += [f"control borrowed heads: {note}" for note in self.notes]
        pct = round(100 * self.confidence)
        with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160):
            lines.append(f"diff = intervened - baseline, {pct}% bootstrap CI")
            lines.append(self.table.to_string())
        return "\n".join(lines)

    def to_pandas(self) -> pd.DataFrame:
        """:attr:`table`: one row per metric."""
        return self.table

    def plot(self, metric: str | None = None) -> go.Figure:
        """Bar chart of the change of every metric (or of ``metric`` only) under the
        interventions, next to the matched random control, with their bootstrap CIs: the
        figure of the explorer's intervention lab (:func:`workbench.figures.effect_bars`)."""
        if metric is not None and metric not in self.table.index:
            raise InterventionError(f"no metric {metric!r} (metrics: {', '.join(self.metrics)})")
        pct = round(100 * self.confidence)
        shown = "each metric" if metric is None else metric
        return effect_bars(
            self.table if metric is None else self.table.loc[[metric]],
            confidence=self.confidence,
            title=f"{self.task}: change of {shown} ({pct}% bootstrap CI)",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: specs, controls, the table, per-example values."""
        return {
            "task": self.task,
            "metrics": list(self.metrics),
            "interventions": [s.to_dict() for s in self.interventions],
            "controls": [[s.to_dict() for s in c] for c in self.controls],
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "table": {
                m: {k: float(v) for k, v in row.items()}
                for m, row in self.table.to_dict(orient="index").items()
            },
            "per_example": {
                c: {m: v.tolist() for m, v in d.items()} for c, d in self.per_example.items()
            },
            "control_draws": {m: v.tolist() for m, v in self.control_draws.items()},
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        head = self.summary().split("\n")[: 2 + len(self.notes) if self.controls else 1]
        return "<br>".join(head) + self.table.to_html(float_format="{:.4f}".format)


def evaluate(
    model: Model,
    task: Task | str,
    interventions: Any,
    *,
    control: bool = True,
    n_controls: int = 3,
    control_exclude: Iterable[Any] = (),
    seed: int = 0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    path: str = "auto",
    batch_size: int = 8,
    max_rows: int = 64,
    progress: bool = False,
) -> EvalResult:
    """Task metric with and without ``interventions`` (a spec, a list, or their JSON form),
    with a bootstrap CI of the difference and ``n_controls`` matched random-head controls
    (never drawn from ``control_exclude``; borrowed from nearby layers where a layer runs short,
    see :func:`matched_control`), their mean and their spread.

    >>> r = evaluate(model, IOI(n=32), ZeroAblation(heads=[(9, 9)]))   # doctest: +SKIP
    >>> r.table.loc["logit_diff", ["baseline", "intervened", "diff"]]  # doctest: +SKIP
    """
    specs = load_specs(interventions)
    task = _as_task(task)
    if not 0 < confidence < 1:
        raise InterventionError(f"confidence must lie in (0, 1), got {confidence}")
    Intervener(model).validate(specs)
    rng = np.random.default_rng(seed)
    info = model.info
    exclude = [parse_head(h) for h in control_exclude]
    notes: list[str] = []
    controls = (
        [
            matched_control(specs, info.n_layers, info.n_heads, rng, exclude, notes)
            for _ in range(n_controls)
        ]
        if control
        else []
    )
    batches = task.batches(model, batch_size)
    if not batches:
        raise InterventionError(f"task {task.name!r} produced no prompts")
    groups = [[], specs, *controls]
    values = _run_groups(model, task, batches, groups, path=path, max_rows=max_rows,
                         progress=progress)  # fmt: skip
    per_example = {"baseline": values[0], "intervened": values[1]}
    draws = {m: np.stack([v[m] for v in values[2:]]) for m in task.metrics} if controls else {}
    if controls:
        per_example["control"] = {m: d.mean(axis=0) for m, d in draws.items()}
    return EvalResult(task.name, tuple(task.metrics), specs, controls, per_example, confidence,
                      n_bootstrap, seed, draws, list(dict.fromkeys(notes)))  # fmt: skip


def top_heads(scores: Any, k: int, *, n_heads: int | None = None) -> list[Head]:
    """The ``k`` highest-scoring heads of a score table (a `workbench.scores.ScoreTable`, a
    ``[n_layers, n_heads]`` array, or a DataFrame with layer, head and one score column)."""
    if isinstance(scores, pd.DataFrame):
        value_col = next(c for c in scores.columns if c not in ("layer", "head"))
        ranked = scores.sort_values(value_col, ascending=False, kind="stable").head(k)
        return [(int(r.layer), int(r.head)) for r in ranked.itertuples()]
    values = np.asarray(getattr(scores, "values", scores), dtype=np.float64)
    if values.ndim != 2:
        raise InterventionError(f"scores must be [n_layers, n_heads], got shape {values.shape}")
    flat = np.argsort(-np.nan_to_num(values, nan=-np.inf).ravel(), kind="stable")[:k]
    return [(int(i // values.shape[1]), int(i % values.shape[1])) for i in flat]


def sweep(
    model: Model,
    task: Task | str,
    heads: Sequence[Any] | None = None,
    *,
    kind: str = "zero",
    options: dict[str, Any] | None = None,
    scores: Any = None,
    top_k: int | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    path: str = "auto",
    batch_size: int = 8,
    max_rows: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """Effect of intervening on each head alone: one row per head with, per metric, its value,
    ``<metric>_diff`` (vs the clean run) and a bootstrap CI; largest headline |diff| first.

    ``heads``: the heads to sweep (default every head, or the ``top_k`` of ``scores``);
    ``kind`` and ``options``: the spec applied to each (``kind="scale", options={"factor": 2}``).
    ``df.attrs["baseline"]`` holds the clean metrics.
    """
    task = _as_task(task)
    info = model.info
    if heads is None:
        if scores is not None:
            heads = top_heads(scores, top_k or 10)
        else:
            heads = [(lay, h) for lay in range(info.n_layers) for h in range(info.n_heads)]
    specs = [spec_from_dict({"kind": kind, "heads": [head], **(options or {})}) for head in heads]
    Intervener(model).validate(specs)
    batches = task.batches(model, batch_size)
    values = _run_groups(model, task, batches, [[], *[[s] for s in specs]], path=path,
                         max_rows=max_rows, progress=progress)  # fmt: skip
    base = values[0]
    rows = []
    for spec, value in zip(specs, values[1:], strict=True):
        layer, head = spec.heads[0]
        row: dict[str, Any] = {"layer": layer, "head": head}
        for m in task.metrics:
            low, high = bootstrap_ci(value[m] - base[m], n_bootstrap=n_bootstrap,
                                     confidence=confidence, seed=seed)  # fmt: skip
            row |= {m: value[m].mean(), f"{m}_diff": (value[m] - base[m]).mean(),
                    f"{m}_ci_low": low, f"{m}_ci_high": high}  # fmt: skip
        rows.append(row)
    frame = pd.DataFrame(rows)
    order = np.argsort(-frame[f"{task.metrics[0]}_diff"].abs().to_numpy(), kind="stable")
    frame = frame.iloc[order].reset_index(drop=True)
    frame.attrs["baseline"] = {m: float(base[m].mean()) for m in task.metrics}
    frame.attrs["kind"] = kind
    frame.attrs["task"] = task.name
    return frame


@dataclass
class KnockoutCurve:
    """The top-k knock-out curve of a score table: the task metric with its k highest-scoring
    heads knocked out together, for each k, against random heads of equal size.

    ``table``: one row per k with ``k``, ``all_labelled`` (the row of every labelled head),
    ``heads`` (``"L.H, ..."``) and, per metric m, the columns of :attr:`EvalResult.table`
    prefixed ``m_`` (``m_intervened``, ``m_diff``, ``m_ci_low``, ``m_ci_high``, ``m_control``,
    ``m_control_diff``, its CI, ``m_control_draw_sd``/``_min``/``_max``). The random heads are
    drawn from the heads the table does not label (nor puts in the top k), layer-matched with
    borrowing (:func:`matched_control`); ``notes`` says where heads were borrowed, per k.
    """

    task: str
    metrics: tuple[str, ...]
    score: str
    kind: str
    baseline: dict[str, float]
    n_labelled: int
    table: pd.DataFrame
    controls: list[list[list[Head]]]  # per row of the table, per draw: the random heads
    notes: list[list[str]]  # per row of the table
    confidence: float

    def summary(self) -> str:
        """The curve as text: per k the change with the top k and with random heads."""
        pct = round(100 * self.confidence)
        lines = [
            f"top-k knock-out ({self.kind}) of score {self.score!r} on {self.task}: "
            f"{self.n_labelled} labelled heads; baseline "
            + ", ".join(f"{m} {v:.4f}" for m, v in self.baseline.items()),
            f"diff = knocked out - baseline, {pct}% bootstrap CI; random: mean of "
            f"{len(self.controls[0])} draws of equal size (sd, min, max of the draws)",
        ]
        for row, notes in zip(self.table.to_dict(orient="records"), self.notes, strict=True):
            mark = " (all labelled)" if row["all_labelled"] else ""
            lines.append(f"k={row['k']}{mark}: {row['heads']}")
            for m in self.metrics:
                lines.append(
                    f"  {m}: top-k {row[f'{m}_diff']:+.4f} [{row[f'{m}_ci_low']:+.4f}, "
                    f"{row[f'{m}_ci_high']:+.4f}]; random {row[f'{m}_control_diff']:+.4f} "
                    f"[{row[f'{m}_control_ci_low']:+.4f}, {row[f'{m}_control_ci_high']:+.4f}] "
                    f"(draws sd {row[f'{m}_control_draw_sd']:.4f}, "
                    f"{row[f'{m}_control_draw_min']:+.4f} .. {row[f'{m}_control_draw_max']:+.4f})"
                )
            lines += [f"  borrowed: {note}" for note in notes]
        return "\n".join(lines)

    def to_pandas(self) -> pd.DataFrame:
        """:attr:`table`: one row per k."""
        return self.table

    def plot(self, metric: str | None = None) -> go.Figure:
        """The curve of ``metric`` (default the task's first) against k, top-k heads and random
        heads with their CIs and the draws' range (:func:`workbench.figures.knockout_figure`)."""
        metric = metric or self.metrics[0]
        if metric not in self.metrics:
            raise InterventionError(f"no metric {metric!r} (metrics: {', '.join(self.metrics)})")
        return knockout_figure(
            self.table,
            metric,
            baseline=self.baseline[metric],
            confidence=self.confidence,
            title=f"{self.task}: {metric} with the top-k {self.score} heads knocked out "
            f"({self.kind}) vs random heads",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the table's rows, the random heads and the notes."""
        return {
            "task": self.task,
            "metrics": list(self.metrics),
            "score": self.score,
            "kind": self.kind,
            "baseline": self.baseline,
            "n_labelled": self.n_labelled,
            "confidence": self.confidence,
            "rows": self.table.to_dict(orient="records"),
            "controls": [[[list(h) for h in d] for d in c] for c in self.controls],
            "notes": self.notes,
        }

    def __repr__(self) -> str:
        return self.summary()


def knockout_curve(
    model: Model,
    task: Task | str,
    scores: Any,
    *,
    ks: Sequence[int] = KNOCKOUT_KS,
    kind: str = "zero",
    options: dict[str, Any] | None = None,
    n_controls: int = 3,
    seed: int = 0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    path: str = "auto",
    batch_size: int = 8,
    max_rows: int = 64,
    progress: bool = False,
) -> KnockoutCurve:
    """Knock out the top-k heads of ``scores`` together for each k in ``ks``, and all its
    labelled heads, each against ``n_controls`` draws of as many random heads that the table does
    not label, all in one pass over the task's batches.

    ``scores``: a :class:`workbench.scores.ScoreTable` (its labelled heads,
    :attr:`~workbench.scores.ScoreTable.selected`, make the row ``all_labelled`` and are kept
    out of the random sets; a labelled set that is not the top k of the scores, because a
    tentative head scores higher, gets its own row) or a ``[n_layers, n_heads]`` array (no
    labelled heads). ``kind`` and
    ``options``: the spec applied (``"zero"``, ``"mean"``, ``"uniform"``, ...). ks larger than
    the number of heads are left out.

    >>> curve = knockout_curve(model, "needle", run.score("retrieval"))  # doctest: +SKIP
    >>> curve.plot()                                                     # doctest: +SKIP
    """
    task = _as_task(task)
    info = model.info
    n_total = info.n_layers * info.n_heads
    if not ks or any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1
                     for k in ks):  # fmt: skip
        raise InterventionError(f"ks must be positive integers, got {list(ks)}")
    if n_controls < 1:
        raise InterventionError(f"n_controls must be >= 1, got {n_controls}")
    values = np.asarray(getattr(scores, "values", scores), dtype=np.float64)
    if values.shape != (info.n_layers, info.n_heads):
        raise InterventionError(
            f"scores must be [n_layers, n_heads] = {(info.n_layers, info.n_heads)}, got "
            f"{values.shape}"
        )
    selected = getattr(scores, "selected", np.zeros(values.shape, dtype=bool))
    labelled = [(int(lay), int(h)) for lay, h in zip(*np.nonzero(selected), strict=True)]
    order = top_heads(values, n_total)  # every head, highest score first
    labelled = [h for h in order if h in set(labelled)]
    chosen = {k: order[:k] for k in sorted({int(k) for k in ks if k <= n_total})}
    rows_heads = [(k, heads, set(heads) == set(labelled)) for k, heads in chosen.items()]
    if labelled and not any(flag for *_, flag in rows_heads):
        rows_heads.append((len(labelled), labelled, True))
        rows_heads.sort(key=lambda row: (row[0], row[2]))
    rng = np.random.default_rng(seed)
    specs, controls, notes = [], [], []
    for _, heads, _ in rows_heads:
        spec = spec_from_dict({"kind": kind, "heads": heads, **(options or {})})
        found: list[str] = []
        try:
            controls.append([
                matched_control([spec], info.n_layers, info.n_heads, rng, labelled, found)
                for _ in range(n_controls)
            ])  # fmt: skip
        except NoControlError as e:  # too few unlabelled heads for a random set this large
            raise NoControlError(e.reason, argument="smaller ks", flag="a smaller --ks") from None
        specs.append(spec)
        notes.append(list(dict.fromkeys(found)))
    Intervener(model).validate(specs)
    batches = task.batches(model, batch_size)
    if not batches:
        raise InterventionError(f"task {task.name!r} produced no prompts")
    groups: list[list[Intervention]] = [[]]
    for spec, drawn in zip(specs, controls, strict=True):
        groups += [[spec], *drawn]
    values_by_group = _run_groups(model, task, batches, groups, path=path, max_rows=max_rows,
                                  progress=progress)  # fmt: skip
    base = values_by_group[0]
    rows = []
    for i, (k, heads, all_labelled) in enumerate(rows_heads):
        start = 1 + i * (1 + n_controls)
        draws = {m: np.stack([v[m] for v in values_by_group[start + 1 : start + 1 + n_controls]])
                 for m in task.metrics}  # fmt: skip
        per_example = {
            "baseline": base,
            "intervened": values_by_group[start],
            "control": {m: d.mean(axis=0) for m, d in draws.items()},
        }
        result = EvalResult(task.name, tuple(task.metrics), [specs[i]], controls[i], per_example,
                            confidence, n_bootstrap, seed, draws, notes[i])  # fmt: skip
        row: dict[str, Any] = {
            "k": k,
            "all_labelled": all_labelled,
            "heads": ", ".join(f"{lay}.{h}" for lay, h in heads),
        }
        for m, metric_row in result.table.iterrows():
            row |= {f"{m}_{col}": float(v) for col, v in metric_row.items() if col != "baseline"}
        rows.append(row)
    return KnockoutCurve(
        task=task.name,
        metrics=tuple(task.metrics),
        score=getattr(scores, "name", "score"),
        kind=kind,
        baseline={m: float(base[m].mean()) for m in task.metrics},
        n_labelled=len(labelled),
        table=pd.DataFrame(rows),
        controls=[[[h for s in c for h in s.heads] for c in drawn] for drawn in controls],
        notes=notes,
        confidence=confidence,
    )
