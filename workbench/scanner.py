"""Scan: run probes over a prompt set and collect their score tables (the façade of the spine).

``scan(model, prompts, probes=..., out="runs/x.h5")`` runs every measurement the chosen probes
declare, batch by batch, stores the per-item statistics in the run file's partial copy, and at the
end turns them into score tables and labels and publishes the run atomically (the steps are
:mod:`workbench.probe`'s). Rerunning an interrupted scan with the same model, prompts and
parameters resumes after the last completed batch of each measurement. Under ``torchrun`` (a
torch.distributed process group) each rank measures its share of every measurement and rank 0
merges them (:mod:`workbench.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probes import get_probes
from workbench import distributed
from workbench.errors import MissingEntryError
from workbench.figures import score_heatmap
from workbench.models import Model, ModelInfo, load
from workbench.probe import Measurement, ScanContext, measure, publish, record, score
from workbench.scores import ScoreTable
from workbench.store import RunWriter
from workbench.tasks import PromptSet, load_prompts


@dataclass
class ScanResult:
    """Score tables of one scan; renders itself in Jupyter."""

    model: ModelInfo
    tables: dict[str, ScoreTable]
    path: Path | None = None

    @property
    def scores(self) -> pd.DataFrame:
        """One row per head: layer, head, kv_head and one column per probe score."""
        layers, heads = np.indices((self.model.n_layers, self.model.n_heads))
        frame = pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel()})
        frame["kv_head"] = frame["head"] // self.model.group_size
        for name, table in self.tables.items():
            frame[name] = table.values.ravel()
        return frame

    @property
    def labels(self) -> pd.DataFrame:
        """One row per labelled head: layer, head, and its labels joined by commas."""
        frame = self.scores[["layer", "head", "kv_head"]].copy()
        names = [[] for _ in range(len(frame))]
        for table in self.tables.values():
            for index in np.flatnonzero(table.selected.ravel()):
                names[index].append(table.label)
        frame["labels"] = [",".join(n) for n in names]
        return frame[frame["labels"] != ""].reset_index(drop=True)

    def heatmap(self, name: str) -> go.Figure:
        """Layer x head heatmap of score ``name``, its labelled heads dotted (the explorer's
        atlas grid: :func:`workbench.figures.score_heatmap`)."""
        if name not in self.tables:
            raise MissingEntryError(
                f"no score {name!r} in this scan (scores: {', '.join(self.tables)})"
            )
        table = self.tables[name]
        return score_heatmap(
            self.model,
            table.values,
            name,
            selected=table.selected if table.label else None,
            title=f"{self.model.name}: {name}",
        )

    def to_pandas(self) -> pd.DataFrame:
        """The scores frame (same as :attr:`scores`), named like every result object's."""
        return self.scores

    def plot(self, name: str | None = None) -> go.Figure:
        """Layer x head heatmap of score ``name`` (default: the first labelled score)."""
        if name is None:
            labelled = [n for n, t in self.tables.items() if t.label]
            name = (labelled or list(self.tables))[0]
        return self.heatmap(name)

    def summary(self) -> str:
        """Plain-text per-head grid for each probe (rows = layers, columns = heads)."""
        lines = []
        for table in self.tables.values():
            rule = f" (label {table.label!r} when > {table.threshold})" if table.label else ""
            lines.append(f"{table.name}: {table.definition}{rule}")
            lines.append("layer " + " ".join(f"   H{h:<2}" for h in range(self.model.n_heads)))
            for layer, row in enumerate(table.values):
                marks = ["*" if table.selected[layer, h] else " " for h in range(len(row))]
                cells = " ".join(f"{v:5.2f}{m}" for v, m in zip(row, marks, strict=True))
                lines.append(f"{layer:>5} {cells}")
            if table.label:
                count = int(table.selected.sum())
                total = table.values.size
                lines.append(f"{count}/{total} heads labelled {table.label!r} (marked *)")
            lines.append("")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        counts = ", ".join(
            f"{int(t.selected.sum())} {t.label}" for t in self.tables.values() if t.label
        )
        head = f"<b>{self.model.name}</b>: {', '.join(self.tables)}; {counts}"
        return head + self.scores.head(20).to_html(index=False, float_format="%.3f")


def scan(
    model: Model | str,
    prompts: PromptSet | str = "demo",
    *,
    probes: str | list[str] = "default",
    out: str | Path | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    path: str = "auto",
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> ScanResult:
    """Run probes on a model over a prompt set.

    Args:
        model: a loaded :class:`Model` or a model spec for :func:`workbench.load`.
        prompts: a :class:`PromptSet`, a shipped prompt-set name or a file path.
        probes: ``"default"`` (:data:`probes.DEFAULT_PROBES`), ``"all"``, comma-separated
            names, or a list (see :data:`probes.PROBES`).
        out: run file to write (atomic; resumable). ``None`` keeps everything in memory.
        max_tokens: truncate prompts to this many tokens.
        batch_size: items per checkpoint of the run file.
        path: capture path, ``"auto"``, ``"pattern"`` or ``"streamed"``.
        options: probe-specific options (each probe documents its own).

    Example:
        >>> import workbench as wb
        >>> result = wb.scan("smollm2-135m", "demo", out="runs/demo.h5")  # doctest: +SKIP
        >>> result.scores.sort_values("sink", ascending=False).head()  # doctest: +SKIP
    """
    model = load(model) if isinstance(model, str) else model
    prompts = load_prompts(prompts) if isinstance(prompts, str | Path) else prompts
    chosen = get_probes(probes)
    ctx = ScanContext(model, prompts, max_tokens, path, dict(options or {}))
    measurements: dict[str, Measurement] = {}
    ranks = distributed.current()
    with model.tokenized(distributed.tokenize_split(model, prompts.texts, max_tokens, ranks)):
        for probe in chosen:
            for m in probe.measurements(ctx):
                measurements.setdefault(m.key, m)
    ctx.check_options()
    parameters = {
        "max_tokens": max_tokens,
        "path": path,
        "prompts": prompts.hash,
        "options": ctx.options,
    }
    if ranks.world_size > 1:  # launched by torchrun: this rank measures its share of the items
        tables, written = distributed.scan_shards(
            measurements,
            chosen,
            ranks,
            out=out,
            info=model.info,
            parameters=parameters,
            batch_size=batch_size,
            progress=progress,
        )
        return ScanResult(model.info, tables, written)
    if out is None:
        stats = {
            key: measure(m, batch_size=batch_size, progress=progress)
            for key, m in measurements.items()
        }
        return ScanResult(model.info, score(chosen, stats))

    writer = RunWriter(out, model.info, parameters)
    try:
        groups = {
            key: record(writer, key, m, batch_size=batch_size, progress=progress)
            for key, m in measurements.items()
        }
        tables, written = publish(writer, groups, chosen)
    finally:
        writer.close()
    return ScanResult(model.info, tables, written)
