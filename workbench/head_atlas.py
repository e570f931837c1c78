"""Head atlas: every head as a fingerprint of its scores, clustered, and laid out in 2-D.

It reads the score tables of a whole run (it is no probe: it measures nothing), for
``wb.atlas(...)`` and the explorer's atlas page.

A head's *fingerprint* is the vector of its values in a scan's score tables (sink mass,
entropy, positional scores, outside-window mass, per-domain sink masses, retrieval score, ...).
Tables that hold a per-layer number repeated over heads (``residual_peak``) are left out: they
say nothing about a head within its layer and would only sort heads by depth. The pipeline is
scikit-learn's:

1. ``SimpleImputer(strategy="mean")`` (a table may have NaN where a statistic is undefined);
2. ``StandardScaler`` (scores live on different scales: entropies near 1, counts in the tens);
3. ``KMeans`` (``n_init=10``, seeded); with ``n_clusters=None`` k is chosen in 2..8 by the best
   silhouette score (Rousseeuw 1987) on the standardised fingerprints;
4. a 2-D embedding of the same standardised fingerprints: ``PCA`` (default; deterministic and
   its axes are linear in the scores) or ``TSNE`` (``method="tsne"``, perplexity capped by the
   number of heads).

:func:`build_atlas` takes a :class:`workbench.scanner.ScanResult`, an open run file
(:func:`workbench.open_run`) or a ``{name: ScoreTable}`` dict and returns an :class:`Atlas`:
``.frame`` (one row per head: layer, head, cluster, x, y, labels and the fingerprint columns),
``.figure()`` (plotly scatter, :func:`workbench.figures.atlas_scatter`) and ``.cluster_summary()``
(mean raw score per cluster), which is what the Dash explorer shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.errors import WorkbenchError
from workbench.figures import ColourScale, atlas_scatter
from workbench.scores import ScoreTable

MAX_AUTO_CLUSTERS = 8
METHODS = ("pca", "tsne")


class AtlasError(WorkbenchError, ValueError):
    """The score tables cannot make an atlas (too few heads or no informative table)."""


@dataclass
class Atlas:
    """Clusters and a 2-D layout of heads; ``frame`` has one row per head."""

    frame: pd.DataFrame
    features: list[str]
    n_clusters: int
    method: str
    silhouette: float  # of the chosen clustering on the standardised fingerprints

    def figure(
        self,
        title: str = "",
        *,
        colour: np.ndarray | None = None,
        colour_name: str = "",
        scale: ColourScale | None = None,
        group_size: int | None = None,
    ) -> go.Figure:
        """Scatter of the 2-D embedding, as the explorer draws it
        (:func:`workbench.figures.atlas_scatter`): coloured by cluster, or by ``colour`` (one
        value per row of :attr:`frame`, e.g. a score) with the cluster as the marker shape.
        Hover shows the head (its KV head, given the model's ``group_size``), cluster, labels
        and fingerprint."""
        shape = " (marker shape)" if colour is not None else ""
        title = title or (
            f"head atlas: {self.method.upper()} of {len(self.features)} standardised scores; "
            f"k-means k={self.n_clusters}{shape}, silhouette {self.silhouette:.2f}"
        )
        return atlas_scatter(
            self.frame,
            self.features,
            method=self.method.upper(),
            group_size=group_size,
            colour=colour,
            colour_name=colour_name,
            scale=scale,
            title=title,
        )

    def plot(self, title: str = "", **colouring: Any) -> go.Figure:
        """The embedding scatter (:meth:`figure`, same arguments), named like every result
        object's plot."""
        return self.figure(title, **colouring)

    def to_pandas(self) -> pd.DataFrame:
        """One row per head: layer, head, cluster, x, y, labels and the fingerprint."""
        return self.frame

    def cluster_summary(self) -> pd.DataFrame:
        """Per cluster: number of heads, the most common labels, and the mean of each score."""
        grouped = self.frame.groupby("cluster")
        summary = grouped[self.features].mean()
        summary.insert(0, "n_heads", grouped.size())
        summary.insert(1, "labels", grouped["labels"].agg(_common_labels))
        return summary

    def _repr_html_(self) -> str:
        head = (
            f"<b>head atlas</b>: {len(self.frame)} heads, {self.n_clusters} clusters "
            f"(silhouette {self.silhouette:.2f}), {self.method.upper()} over {len(self.features)} "
            "scores"
        )
        return head + self.cluster_summary().to_html(float_format="%.3f")


def build_atlas(
    source: Any,
    *,
    features: list[str] | None = None,
    n_clusters: int | None = None,
    method: str = "pca",
    seed: int = 0,
) -> Atlas:
    """Cluster heads by their score fingerprints and embed them in 2-D (module docstring).

    Args:
        source: a ``ScanResult``, an open ``Run``, or ``{name: ScoreTable}``.
        features: score names to use; default every table except per-layer ones.
        n_clusters: k for KMeans; None picks 2..8 by silhouette.
        method: ``"pca"`` or ``"tsne"``.
        seed: random state of KMeans and t-SNE.

    Raises:
        AtlasError: unknown method or feature, fewer than 3 heads, or no usable table.
    """
    # lazy: scikit-learn takes a second or more to import, and `import workbench` reaches here
    from sklearn.decomposition import PCA
    from sklearn.impute import SimpleImputer
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    if method not in METHODS:
        raise AtlasError(f"method must be one of {METHODS}, got {method!r}")
    tables = _tables(source)
    if features is None:
        features = [name for name, t in tables.items() if _informative(t.values)]
    unknown = [f for f in features if f not in tables]
    if unknown:
        raise AtlasError(f"no score table(s) {', '.join(unknown)} (have: {', '.join(tables)})")
    if not features:
        raise AtlasError("no score table varies across the heads of a layer; nothing to cluster")
    first = tables[features[0]].values
    layers, heads = np.indices(first.shape)
    n_heads = first.size
    if n_heads < 3:
        raise AtlasError(f"an atlas needs at least 3 heads, got {n_heads}")
    raw = np.stack([tables[f].values.ravel() for f in features], axis=1)  # [head, feature]
    usable = ~np.isnan(raw).all(0)
    features = [f for f, ok in zip(features, usable, strict=True) if ok]
    raw = raw[:, usable]
    scaled = StandardScaler().fit_transform(SimpleImputer(strategy="mean").fit_transform(raw))

    if n_clusters is None:
        candidates = range(2, min(MAX_AUTO_CLUSTERS, n_heads - 1) + 1)
        fits = {k: _kmeans(scaled, k, seed) for k in candidates}
        scores = {k: np.nan_to_num(_silhouette(scaled, lab), nan=-1.0) for k, lab in fits.items()}
        n_clusters = max(scores, key=lambda k: (scores[k], -k))
        labels = fits[n_clusters]
    else:
        if not 1 <= n_clusters <= n_heads:
            raise AtlasError(f"n_clusters must be in 1..{n_heads}, got {n_clusters}")
        labels = _kmeans(scaled, n_clusters, seed)

    if method == "pca":
        xy = PCA(n_components=2, random_state=seed).fit_transform(scaled)
    else:
        perplexity = float(min(30, max(2, (n_heads - 1) // 3)))
        xy = TSNE(n_components=2, perplexity=perplexity, random_state=seed).fit_transform(scaled)

    frame = pd.DataFrame(
        {
            "layer": layers.ravel(),
            "head": heads.ravel(),
            "cluster": labels,
            "x": xy[:, 0],
            "y": xy[:, 1],
            "labels": _label_column(tables, n_heads),
        }
    )
    frame = pd.concat([frame, pd.DataFrame(raw, columns=features)], axis=1)
    return Atlas(frame, features, int(n_clusters), method, _silhouette(scaled, labels))


def _tables(source: Any) -> dict[str, ScoreTable]:
    if isinstance(source, dict):
        return source
    if hasattr(source, "tables"):  # ScanResult
        return dict(source.tables)
    if hasattr(source, "score_names"):  # workbench.store.Run
        return {name: source.score(name) for name in source.score_names}
    raise AtlasError(f"expected a ScanResult, a Run or a dict of ScoreTables, got {type(source)}")


def _informative(values: np.ndarray) -> bool:
    """False for all-NaN tables and for per-layer numbers repeated over the heads."""
    if np.isnan(values).all():
        return False
    spread = np.nanmax(values, axis=1) - np.nanmin(values, axis=1)  # [layer]
    return bool(np.nanmax(spread) > 0)


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans  # lazy, as in build_atlas

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(x) - 1:
        return float("nan")
    from sklearn.metrics import silhouette_score  # lazy, as in build_atlas

    return float(silhouette_score(x, labels))


def _label_column(tables: dict[str, ScoreTable], n_heads: int) -> list[str]:
    names: list[list[str]] = [[] for _ in range(n_heads)]
    for table in tables.values():
        if table.label:
            for index in np.flatnonzero(table.selected.ravel()):
                names[index].append(table.label)
    return [",".join(n) for n in names]


def _common_labels(column: pd.Series) -> str:
    counts = pd.Series([lab for text in column for lab in text.split(",") if lab]).value_counts()
    return ", ".join(f"{name} ({n})" for name, n in counts.head(3).items())
