"""The evaluation loop: a task metric with and without interventions.

:func:`evaluate` runs the task's batches once with three kinds of group in the same forward pass
(see :mod:`interventions.engine`): the clean model, the interventions, and matched random
controls: the same specs moved to as many random heads *of the same layers*, drawn (seeded)
from the heads no spec touches. It reports per metric the mean with and without, their
difference with a paired bootstrap confidence interval (examples resampled with replacement,
percentile interval), and the same for the control, so that "this head matters" is read against
"any head of that layer matters this much".

:func:`sweep` measures one intervention per head (every head, a list, or the top-k of a probe's
score table), many heads per forward pass.
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
from workbench.figures import effect_bars
from workbench.models import Model
from workbench.tasks import Task, TaskBatch, get_task

__all__ = ["EvalResult", "bootstrap_ci", "evaluate", "matched_control", "sweep", "top_heads"]


def bootstrap_ci(
    values: np.ndarray, *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values [n]``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1 or n_bootstrap < 1:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(n_bootstrap, values.size))
    means = values[index].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def matched_control(
    specs: Sequence[Intervention],
    n_layers: int,
    n_heads: int,
    rng: np.random.Generator,
    exclude: Iterable[Head] = (),
) -> list[Intervention]:
    """The specs moved to random heads: per spec and layer, as many heads of that layer, drawn
    without replacement from the heads that no spec touches and ``exclude`` does not name
    (e.g. every head a probe labels, for a "random non-retrieval heads" control)."""
    taken = {h for spec in specs for h in spec.heads} | {tuple(h) for h in exclude}
    out = []
    for spec in specs:
        heads: list[Head] = []
        for layer in spec.layers:
            pool = [h for h in range(n_heads) if (layer, h) not in taken]
            need = len(spec.heads_in(layer))
            if len(pool) < need:
                raise InterventionError(
                    f"no matched control: layer {layer} has {len(pool)} untouched heads, the "
                    f"interventions use {need}; pass control=False"
                )
            heads += [(layer, int(h)) for h in rng.choice(pool, size=need, replace=False)]
        out.append(spec.with_heads(heads))
    return out


def _as_specs(interventions: Any) -> list[Intervention]:
    if isinstance(interventions, Intervention):
        return [interventions]
    if isinstance(interventions, (str, dict)):
        return load_specs(interventions)
    specs = list(interventions)
    if not specs:
        raise InterventionError("no interventions given")
    return [s if isinstance(s, Intervention) else spec_from_dict(s) for s in specs]


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
    (``control``, ``control_diff``, ...). ``per_example``: ``{"baseline"|"intervened"|"control":
    {metric: [n]}}`` (the control averaged over its draws).
    """

    task: str
    metrics: tuple[str, ...]
    interventions: list[Intervention]
    controls: list[list[Intervention]]
    per_example: dict[str, dict[str, np.ndarray]]
    confidence: float
    n_bootstrap: int
    seed: int
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
        }

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        head = self.summary().split("\n")[: 2 if self.controls else 1]
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
    (never drawn from ``control_exclude``).

    >>> r = evaluate(model, IOI(n=32), ZeroAblation(heads=[(9, 9)]))   # doctest: +SKIP
    >>> r.table.loc["logit_diff", ["baseline", "intervened", "diff"]]  # doctest: +SKIP
    """
    specs = _as_specs(interventions)
    task = _as_task(task)
    if not 0 < confidence < 1:
        raise InterventionError(f"confidence must lie in (0, 1), got {confidence}")
    Intervener(model).validate(specs)
    rng = np.random.default_rng(seed)
    info = model.info
    exclude = [parse_head(h) for h in control_exclude]
    controls = (
        [
            matched_control(specs, info.n_layers, info.n_heads, rng, exclude)
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
    if controls:
        per_example["control"] = {
            m: np.mean([v[m] for v in values[2:]], axis=0) for m in task.metrics
        }
    return EvalResult(task.name, tuple(task.metrics), specs, controls, per_example, confidence,
                      n_bootstrap, seed)  # fmt: skip


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
