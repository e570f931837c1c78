"""Serving export: which KV heads keep the full cache, in the formats serving stacks read.

One selection, made once at KV-head level (serving stacks keep or evict KV per KV head), feeds
every format but ``json`` and ``head-scores``. Each format is written the way its consumer's own
loader reads it (docs/export.md says what each consumer then does with it):

* ``json``: the canonical HeadMap (``headmap.json``, schema ``workbench/schemas``).
* ``duo``: DuoAttention (mit-han-lab/duo-attention, ``duo_attn/utils.py``; also NVIDIA kvpress's
  ``DuoAttentionPress``): ``full_attention_heads.tsv``, no header, one row per layer, one value
  per KV head, tab-separated, ``%.18e`` (what DuoAttention's ``np.savetxt`` writes and its
  ``np.loadtxt(path, dtype=float, delimiter="\\t")`` reads), plus ``config.json`` with
  ``sink_size`` and ``recent_size``. Both consumers *rank* these values and make the lowest
  share streaming heads, so by default (``values="scores"``) the values are the selection's KV
  scores min-max normalised to [0, 1]: ``(s - min) / (max - min)`` over the finite KV scores
  (NaN scores become 0; a map whose scores are all equal is written as all 1). The map's own
  selection is the top ``1 - sparsity`` of them, ``sparsity`` (written into ``config.json``)
  being the streaming share. ``values="binary"`` writes 1 for full and 0 for streaming heads.
  ``np.loadtxt`` squeezes a dimension of length 1: for a model with one KV head per layer (or one
  layer) the consumer needs ``ndmin=2`` to read the ``[n_layers, n_kv_heads]`` array back.
* ``layer-heads``: ``{"<layer>": [heads]}`` of the full heads per layer, empty layers dropped
  (golden-stick RazorAttention's ``head_dict.json``). ``index="kv"`` (default, what RazorAttention
  reads) lists KV-head indices; ``index="query"`` lists every query head whose KV head is full.
* ``moa``: thu-nics MoA's ``moa_alpha_beta.json``, ``{"alphas": [[...]], "betas": [[...]]}``, one
  list per layer with one value per query head (MoA runs GQA models as multi-head ones); a head
  attends to ``alpha + beta * length`` keys, so full heads get ``alpha = 0, beta = 1`` and
  streaming heads ``alpha = sink_size + recent_size, beta = 0``.
* ``head-scores``: ``{"<layer>-<head>": [score per trial]}`` (Retrieval_Head / HeadKV style);
  a single-element list when the run kept no per-trial scores. Trials stored as NaN (those that
  did not count, e.g. the model missed the needle) are left out.

Selection: the KV scores of one score table (default: the table labelled ``policy.full_label``)
above ``threshold`` (default the table's own), or the top ``full_fraction`` of KV heads.
Ties are broken by (layer, KV head) order, so the output is deterministic.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.atomic import atomic_files, atomic_write_text
from workbench.headmap import HeadMap, HeadMapError

FORMATS = ("json", "duo", "layer-heads", "moa", "head-scores")
DUO_VALUES = ("scores", "binary")  # duo: normalised KV scores (default) or 1/0
HEAD_INDEX = ("kv", "query")  # layer-heads: KV-head indices (default) or query-head indices


@dataclass(frozen=True)
class Selection:
    """Which KV heads keep the full cache, and the KV scores the choice was made on."""

    score: str
    kv_full: np.ndarray  # [n_layers, n_kv_heads] bool
    kv_scores: np.ndarray  # [n_layers, n_kv_heads] float, -inf where the score is not finite
    rule: str  # human-readable: "retrieval > 0.1 (max over KV group)"

    @property
    def full_fraction(self) -> float:
        return float(self.kv_full.mean())

    @property
    def tied_at_cut(self) -> bool:
        """Whether a full and a streaming KV head have the same score, so that a consumer that
        ranks the scores (``duo`` with ``values="scores"``) may break the tie the other way. A
        non-finite score ranks as the lowest finite one, as :func:`normalised_scores` writes it."""
        finite = np.isfinite(self.kv_scores)
        lowest = self.kv_scores[finite].min() if finite.any() else 0.0
        ranked = np.where(finite, self.kv_scores, lowest)
        full, streaming = ranked[self.kv_full], ranked[~self.kv_full]
        return bool(full.size and streaming.size and full.min() <= streaming.max())


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
        rule = f"top {full_fraction:g} of KV heads by {name} ({gqa})"
        return Selection(name, full.reshape(kv.shape), kv, rule)
    threshold = headmap.table(name).threshold if threshold is None else threshold
    if threshold is None:
        raise HeadMapError(f"score {name!r} has no threshold; pass a threshold or a full fraction")
    return Selection(name, kv > threshold, kv, f"{name} > {threshold:g} ({gqa})")


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
    values: str | None = None,
    index: str | None = None,
) -> list[Path]:
    """Write ``fmt`` into ``out_dir``; returns the files written (each atomically, with the
    umask's normal permissions).

    ``values`` (``duo`` only): ``"scores"`` (default) or ``"binary"``; ``index`` (``layer-heads``
    only): ``"kv"`` (default) or ``"query"``. See the module docstring.
    """
    if fmt not in FORMATS:
        raise HeadMapError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    _check_option("values", values, DUO_VALUES, fmt, "duo")
    _check_option("index", index, HEAD_INDEX, fmt, "layer-heads")
    out = Path(out_dir)
    if fmt == "json":
        return [headmap.save(out / "headmap.json")]
    selection = select_full(headmap, score=score, threshold=threshold, full_fraction=full_fraction)
    if fmt == "duo":
        return _duo(headmap, selection, values or DUO_VALUES[0], out)
    if fmt == "layer-heads":
        heads = _layer_heads(headmap, selection, index or HEAD_INDEX[0])
        return [_write_json(out / "layer_heads.json", heads)]
    if fmt == "moa":
        return [_moa(headmap, selection, out)]
    return [_write_json(out / "head_scores.json", _head_scores(headmap, selection.score))]


def _check_option(name: str, value: str | None, choices: tuple, fmt: str, owner: str) -> None:
    """An option of one format: refused for the others, and checked against its choices."""
    if value is None:
        return
    if fmt != owner:
        raise HeadMapError(f"{name} applies to the {owner!r} format only, not {fmt!r}")
    if value not in choices:
        raise HeadMapError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def normalised_scores(kv_scores: np.ndarray) -> np.ndarray:
    """``[n_layers, n_kv_heads]`` KV scores min-max scaled to [0, 1] over the finite ones; a
    non-finite score becomes 0, the value of the lowest finite one (finite scores that are all
    equal become 1). Order-preserving, so a consumer that ranks the values ranks the heads as the
    scores do."""
    finite = np.isfinite(kv_scores)
    if not finite.any():
        return np.zeros(kv_scores.shape)
    lo, hi = float(kv_scores[finite].min()), float(kv_scores[finite].max())
    filled = np.where(finite, kv_scores, lo).astype(np.float64)
    scaled = (filled - lo) / (hi - lo) if hi > lo else np.ones(kv_scores.shape)
    return np.where(finite, scaled, 0.0)


def _duo(headmap: HeadMap, selection: Selection, values: str, out: Path) -> list[Path]:
    if values == "binary":
        table = selection.kv_full.astype(np.float64)
    else:
        table = normalised_scores(selection.kv_scores)
    text = io.StringIO()
    np.savetxt(text, table, fmt="%.18e", delimiter="\t")  # DuoAttention's own writer's format
    config = {
        "sink_size": headmap.policy.sink_size,
        "recent_size": headmap.policy.recent_size,
        # the streaming share: DuoAttention's `sparsity`, kvpress's `head_compression_ratio`
        "sparsity": 1.0 - selection.full_fraction,
        "values": values,
        "selection": selection.rule,
        "model": headmap.model.name,
    }
    # the two files are one map: both are written before either replaces its old version
    files = {"full_attention_heads.tsv": text.getvalue(), "config.json": _json_text(config)}
    return atomic_files(out, files)


def _layer_heads(headmap: HeadMap, selection: Selection, index: str) -> dict[str, list[int]]:
    full = selection.kv_full  # [n_layers, n_kv_heads]
    if index == "query":  # query head h reads KV head h // group_size
        full = np.repeat(full, headmap.model.group_size, axis=1)  # [n_layers, n_heads]
    return {str(layer): np.flatnonzero(row).tolist() for layer, row in enumerate(full) if row.any()}


def _moa(headmap: HeadMap, selection: Selection, out: Path) -> Path:
    """MoA's spans: a head attends to ``alpha + beta * length`` keys."""
    full = np.repeat(selection.kv_full, headmap.model.group_size, axis=1)  # [n_layers, n_heads]
    window = float(headmap.policy.sink_size + headmap.policy.recent_size)
    document = {
        "alphas": np.where(full, 0.0, window).tolist(),
        "betas": np.where(full, 1.0, 0.0).tolist(),
    }
    # one line, as MoA's own json.dump writes its moa_alpha_beta.json
    return atomic_write_text(out / "moa_alpha_beta.json", json.dumps(document) + "\n")


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
