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

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probes import get_probes
from workbench import distributed
from workbench.atomic import atomic_write_text, check_output
from workbench.errors import MissingEntryError, OutputError
from workbench.figures import layer_profile, score_heatmap
from workbench.models import Model, ModelInfo, load
from workbench.probe import Measurement, ScanContext, measure, publish, record, score
from workbench.scores import ScoreTable
from workbench.store import RunWriter
from workbench.tasks import PromptSet, load_prompts

TOP_HEADS = 5  # heads named per score in a scan's summary
WIDTH = 100  # characters per line of the summary's wrapped text
LAYERS_PER_ROW = 10  # layers per row of a per-layer quantity in the summary


def figure_path(run: str | Path) -> Path:
    """Where a scan's HTML figure goes: beside the run file, its suffix ``.html``
    (``runs/demo.h5`` -> ``runs/demo.html``; a run file already named ``.html`` gets a second)."""
    run = Path(run)
    return run.with_name(run.name + ".html") if run.suffix == ".html" else run.with_suffix(".html")


@dataclass
class ScanResult:
    """Score tables of one scan; renders itself in Jupyter, as a compact :meth:`summary` (what
    ``workbench scan`` prints), as layer x head :meth:`grids` (``workbench show``) and as a page
    of figures (:meth:`write_html`, which ``workbench scan`` writes beside the run file)."""

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
        """The figure of score ``name`` (default: the first labelled score): its layer x head
        heatmap, or one value per layer for a per-layer quantity
        (:attr:`ScoreTable.layer_values`, :func:`workbench.figures.layer_profile`)."""
        if name is None:
            labelled = [n for n, t in self.tables.items() if t.label]
            name = (labelled or list(self.tables))[0]
        per_layer = self.tables[name].layer_values if name in self.tables else None
        if per_layer is None:
            return self.heatmap(name)
        title = f"{self.model.name}: {name}, per layer (every head of a layer has this value)"
        return layer_profile(self.model, per_layer, name, title=title)

    def summary(self, top: int = TOP_HEADS) -> str:
        """Compact text per score: its definition and how many items it averages; with a label,
        how many heads got it under the label rule (the lower bound of the head's bootstrap
        interval above the threshold, :attr:`ScoreTable.selected`), how many are tentative,
        and the labelled heads per layer; the ``top`` heads with the highest score (and, for a
        score without a label, whose direction the summary cannot know, the lowest); a
        per-layer quantity as one value per layer. Heads are named ``layer.head``. The full
        grids are :meth:`grids` (``workbench show``)."""
        info = self.model
        lines = [
            f"{info.name}: {info.n_layers} layers x {info.n_heads} heads "
            f"({info.n_kv_heads} KV heads); heads are named layer.head"
        ]
        for table in self.tables.values():
            lines += ["", *_table_summary(table, top)]
        return "\n".join(lines)

    def grids(self) -> str:
        """Plain-text grid of each score: rows are layers, columns heads, labelled heads
        marked ``*``; a per-layer quantity is one column of values."""
        lines = []
        for table in self.tables.values():
            rule = f" (label {table.label!r} when {table.rule})" if table.label else ""
            lines.append(f"{table.name}: {table.definition}{rule}")
            per_layer = table.layer_values
            if per_layer is None:
                lines.append("layer " + " ".join(f"   H{h:<2}" for h in range(self.model.n_heads)))
                for layer, row in enumerate(table.values):
                    marks = ["*" if table.selected[layer, h] else " " for h in range(len(row))]
                    cells = " ".join(f"{v:5.2f}{m}" for v, m in zip(row, marks, strict=True))
                    lines.append(f"{layer:>5} {cells}")
            else:
                lines.append("layer    value  (every head of the layer)")
                for layer, value in enumerate(per_layer):
                    mark = "*" if table.selected[layer].all() else " "
                    lines.append(f"{layer:>5} {value:8.2f}{mark}")
            if table.label:
                count = int(table.selected.sum())
                total = table.values.size
                lines.append(f"{count}/{total} heads labelled {table.label!r} (marked *)")
            lines.append("")
        return "\n".join(lines)

    def write_html(self, path: str | Path | None = None) -> Path:
        """Write every score's figure (:meth:`plot`) under its :meth:`summary` lines into one
        self-contained HTML page, atomically; plotly.js is inlined once, so the page opens
        offline. ``path`` defaults to :func:`figure_path` of the run file. Returns the path."""
        if path is None:
            if self.path is None:
                raise OutputError(
                    "this scan kept no run file to put the figure beside; give a path"
                )
            path = figure_path(self.path)
        path = check_output(Path(path))
        title = f"{self.model.name}: scan" + (f" {self.path}" if self.path else "")
        sections = []
        for index, (name, table) in enumerate(self.tables.items()):
            figure = self.plot(name).to_html(full_html=False, include_plotlyjs=index == 0)
            text = html.escape("\n".join(_table_summary(table, TOP_HEADS)))
            sections.append(f"<section><pre>{text}</pre>{figure}</section>")
        page = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title></head>\n"
            f'<body style="font-family: sans-serif"><h1>{html.escape(title)}</h1>\n'
            + "\n".join(sections)
            + "\n</body></html>\n"
        )
        return atomic_write_text(path, page)

    def _repr_html_(self) -> str:
        counts = ", ".join(
            f"{int(t.selected.sum())} {t.label}" for t in self.tables.values() if t.label
        )
        head = f"<b>{self.model.name}</b>: {', '.join(self.tables)}; {counts}"
        return head + self.scores.head(20).to_html(index=False, float_format="%.3f")


def _number(value: float) -> str:
    """A score in a few characters: two decimals, one from 10 on, none from 100 on."""
    if not np.isfinite(value):
        return "nan"
    size = abs(value)
    return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}"


def ranked_heads(values: np.ndarray, n: int, *, highest: bool = True) -> list[tuple[int, int]]:
    """``(layer, head)`` of the ``n`` heads with the highest (or lowest) finite score of
    ``values [n_layers, n_heads]``; ties keep layer-then-head order, NaN heads are left out."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    finite = np.flatnonzero(np.isfinite(flat))
    order = np.argsort(-flat[finite] if highest else flat[finite], kind="stable")
    return [divmod(int(i), values.shape[1]) for i in finite[order][:n]]


def _heads_line(what: str, table: ScoreTable, top: int, *, highest: bool) -> str:
    heads = ranked_heads(table.values, top, highest=highest)
    named = ", ".join(
        f"{layer}.{head} ({_number(table.values[layer, head])})" for layer, head in heads
    )
    return f"  {what}: {named or 'none (no finite score)'}"


def _table_summary(table: ScoreTable, top: int) -> list[str]:
    """The lines of :meth:`ScanResult.summary` for one score table."""
    items = ""
    if table.interval is not None and table.interval.n_trials.size:
        fewest, most = int(table.interval.n_trials.min()), int(table.interval.n_trials.max())
        items = f" ({most} items)" if fewest == most else f" ({fewest}-{most} items)"
    lines = textwrap.wrap(
        f"{table.name}{items}: {table.definition}", WIDTH, subsequent_indent="    "
    )
    values = table.values
    if table.label:
        labelled = table.selected
        text = f"{int(labelled.sum())}/{values.size} heads labelled {table.label!r}: {table.rule}"
        if table.interval is not None:
            tentative = int(table.tentative.sum())
            text += f"; {tentative} tentative (score > {table.threshold}, lower bound not)"
        lines += textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="    ")
        if labelled.any():
            counts = labelled.sum(axis=1)
            groups = [
                " ".join(str(c) for c in counts[start : start + LAYERS_PER_ROW])
                for start in range(0, len(counts), LAYERS_PER_ROW)
            ]
            per_layer = f"labelled per layer from layer 0: {' | '.join(groups)}"
            lines += textwrap.wrap(per_layer, WIDTH, initial_indent="  ", subsequent_indent="    ")
    missing = int(np.isnan(values).sum())
    if missing:
        lines.append(f"  {missing}/{values.size} heads without a score (no finite item)")
    layer_values = table.layer_values
    if layer_values is not None:
        lines.append("  per layer (every head of a layer has this value):")
        for start in range(0, len(layer_values), LAYERS_PER_ROW):
            chunk = layer_values[start : start + LAYERS_PER_ROW]
            span = f"{start}-{start + len(chunk) - 1}"
            lines.append(f"  {span:>9} " + " ".join(f"{_number(v):>5}" for v in chunk))
        return lines
    lines.append(_heads_line("highest", table, top, highest=True))
    if not table.label:
        lines.append(_heads_line("lowest", table, top, highest=False))
    return lines


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
