import numpy as np
import pytest

from workbench.head_atlas import AtlasError, build_atlas
from workbench.scores import ScoreTable


def planted_tables():
    """Two planted head types in a 4 x 6 model: 'sinks' (high a, low b) and the rest."""
    rng = np.random.default_rng(0)
    sink = np.zeros((4, 6), dtype=bool)
    sink[:, :3] = True
    a = np.where(sink, 0.9, 0.1) + rng.normal(0, 0.02, (4, 6))
    b = np.where(sink, 0.1, 0.8) + rng.normal(0, 0.02, (4, 6))
    per_layer = np.repeat(np.arange(4.0)[:, None], 6, axis=1)
    tables = {
        "a": ScoreTable("a", a, "a", threshold=0.5, label="sink"),
        "b": ScoreTable("b", b, "b"),
        "depth": ScoreTable("depth", per_layer, "per-layer number"),
    }
    return tables, sink


def test_atlas_recovers_planted_clusters():
    tables, sink = planted_tables()
    atlas = build_atlas(tables)
    assert atlas.features == ["a", "b"]  # the per-layer table is left out
    assert atlas.n_clusters == 2
    clusters = atlas.frame["cluster"].to_numpy().reshape(4, 6)
    assert len(set(clusters[sink])) == 1 and len(set(clusters[~sink])) == 1
    assert set(clusters[sink]) != set(clusters[~sink])
    assert (atlas.frame.loc[sink.ravel(), "labels"] == "sink").all()
    summary = atlas.cluster_summary()
    assert summary["n_heads"].sum() == 24
    fig = atlas.figure()
    assert sum(len(trace.x) for trace in fig.data) == 24
    assert sum(len(trace.x) for trace in atlas.plot().data) == 24
    assert atlas.to_pandas() is atlas.frame


def test_atlas_tsne_and_fixed_k():
    tables, _ = planted_tables()
    atlas = build_atlas(tables, n_clusters=3, method="tsne")
    assert atlas.n_clusters == 3 and atlas.frame[["x", "y"]].notna().all().all()


def test_atlas_errors():
    tables, _ = planted_tables()
    with pytest.raises(AtlasError, match="method"):
        build_atlas(tables, method="umap")
    with pytest.raises(AtlasError, match="no score table"):
        build_atlas(tables, features=["nope"])
    with pytest.raises(AtlasError, match="varies"):
        build_atlas({"depth": tables["depth"]})
