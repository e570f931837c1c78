"""Serving export: which KV heads keep the full cache, in the formats serving stacks read.

One selection, made once at KV-head level (serving stacks keep or evict KV per KV head), feeds
every format:

* ``json``: the canonical HeadMap (``headmap.json``, schema ``workbench/schemas``).
* ``duo``: DuoAttention (mit-han-lab/duo-attention): ``full_attention_heads.tsv``, no header,
  one row per layer, one tab-separated float per KV head (written with ``np.savetxt``, read with
  ``np.loadtxt(path, delimiter="\\t")``), plus ``config.json`` with ``sink_size`` and
  ``recent_size``. Values are 1.0 for full heads and 0.0 for streaming heads, so DuoAttention's
  threshold 0.5 (or any sparsity quantile matching the selected share) reproduces the selection.
* ``layer-heads``: ``{"<layer>": [query heads]}`` of full-attention query heads, empty layers
  dropped (RazorAttention / golden-stick style). A query head is listed when its KV head is full.
* ``head-scores``: ``{"<layer>-<head>": [score per trial]}`` (Retrieval_Head / HeadKV style);
  a single-element list when the run kept no per-trial scores. Trials stored as NaN (those that
  did not count, e.g. the model missed the needle) are left out.

Selection: the KV scores of one score table (default: the table labelled ``policy.full_label``)
above ``threshold`` (default the table's own), or the top ``full_fraction`` of KV heads.
Ties are broken by (layer, KV head) order, so the output is deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.atomic import atomic_files, atomic_write_text
from workbench.headmap import HeadMap, HeadMapError

FORMATS = ("json", "duo", "layer-heads", "head-scores")


@dataclass(frozen=True)
class Selection:
    score: str
    kv_full: np.ndarray  # [n_layers, n_kv_heads] bool
    rule: str  # human-readable: "retrieval > 0.1 (max over KV group)"

    @property
    def full_fraction(self) -> float:
        return float(self.kv_full.mean())


def select_full(
    headmap: HeadMap,
    *,
    score: str | None = None,
    threshold: float | None = None,
    full_fraction: float | None = None,
) -> Selection:
    """KV heads that keep the full cache (see the module docstring)."""
    if threshold is not None and full_fraction is not None:
        raise HeadMapError("give a threshold or a full fraction, not both")
    name = score or _default_score(headmap)
    kv = headmap.kv_scores(name)  # [n_layers, n_kv_heads]
    kv = np.where(np.isfinite(kv), kv, -np.inf)
    gqa = f"{headmap.policy.gqa_rule} over KV group"
    if full_fraction is not None:
        if not 0.0 <= full_fraction <= 1.0:
            raise HeadMapError(f"full fraction must be in [0, 1], got {full_fraction}")
        count = round(full_fraction * kv.size)
        order = np.argsort(-kv.ravel(), kind="stable")[:count]
        full = np.zeros(kv.size, dtype=bool)
        full[order] = True
        return Selection(
            name, full.reshape(kv.shape), f"top {full_fraction:g} of KV heads by {name} ({gqa})"
        )
    threshold = headmap.table(name).threshold if threshold is None else threshold
    if threshold is None:
        raise HeadMapError(f"score {name!r} has no threshold; pass a threshold or a full fraction")
    return Selection(name, kv > threshold, f"{name} > {threshold:g} ({gqa})")


def _default_score(headmap: HeadMap) -> str:
    label = headmap.policy.full_label
    for name, table in headmap.tables.items():
        if table.label == label:
            return name
    raise HeadMapError(
        f"no score carries the full-attention label {label!r} (scores: "
        f"{', '.join(headmap.tables)}); choose one with --score"
    )


def export(
    headmap: HeadMap,
    fmt: str,
    out_dir: str | Path,
    *,
    score: str | None = None,
    threshold: float | None = None,
    full_fraction: float | None = None,
) -> list[Path]:
    """Write ``fmt`` into ``out_dir``; returns the files written (each atomically)."""
    if fmt not in FORMATS:
        raise HeadMapError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    out = Path(out_dir)
    if fmt == "json":
        return [headmap.save(out / "headmap.json")]
    selection = select_full(headmap, score=score, threshold=threshold, full_fraction=full_fraction)
    if fmt == "duo":
        return _duo(headmap, selection, out)
    if fmt == "layer-heads":
        return [_write_json(out / "layer_heads.json", _layer_heads(headmap, selection))]
    return [_write_json(out / "head_scores.json", _head_scores(headmap, selection.score))]


def _duo(headmap: HeadMap, selection: Selection, out: Path) -> list[Path]:
    rows = ["\t".join(f"{float(v):.1f}" for v in row) for row in selection.kv_full]
    config = {
        "sink_size": headmap.policy.sink_size,
        "recent_size": headmap.policy.recent_size,
        "selection": selection.rule,
        "model": headmap.model.name,
    }
    # the two files are one map: both are written before either replaces its old version
    files = {"full_attention_heads.tsv": "\n".join(rows) + "\n", "config.json": _json_text(config)}
    return atomic_files(out, files)


def _layer_heads(headmap: HeadMap, selection: Selection) -> dict[str, list[int]]:
    group = headmap.model.group_size
    result = {}
    for layer, row in enumerate(selection.kv_full):
        heads = [h for h in range(headmap.model.n_heads) if row[h // group]]
        if heads:
            result[str(layer)] = heads
    return result


def _head_scores(headmap: HeadMap, name: str) -> dict[str, list[float]]:
    table = headmap.table(name)
    trials = headmap.per_item.get(name)  # [n_items, n_layers, n_heads] or None
    result = {}
    for layer in range(headmap.model.n_layers):
        for head in range(headmap.model.n_heads):
            values = [table.values[layer, head]] if trials is None else trials[:, layer, head]
            result[f"{layer}-{head}"] = [round(float(v), 6) for v in values if np.isfinite(v)]
    return result


def _json_text(document: object) -> str:
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


def _write_json(path: Path, document: object) -> Path:
    return atomic_write_text(path, _json_text(document))
