"""Notebook entry points that reach across packages: the atlas, interventions and the IOI
circuit (the interventions plugin), attention figures and the serving export. ``wb.<name>``
resolves here (see the package's ``__init__``).

    import workbench as wb
    atlas = wb.atlas(result)                  # workbench.head_atlas.Atlas: .plot(), .to_pandas()
    circuit = wb.ioi(model, n=16)                  # interventions.circuit.Circuit
    wb.export_map("runs/x.h5", "duo", "maps/x", full_fraction=0.25)   # files for serving stacks
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interventions import evaluate, intervene
from interventions.circuit import Circuit
from interventions.ioi import find_circuit
from workbench.export import export
from workbench.figures import plot_attention
from workbench.head_atlas import Atlas, build_atlas
from workbench.headmap import HeadMap, Policy
from workbench.models import Model
from workbench.store import Run, open_run

__all__ = ["atlas", "evaluate", "export_map", "intervene", "ioi", "plot_attention"]


def atlas(source: Any, **options: Any) -> Atlas:
    """Cluster and embed the heads of a scan result, an open run or a run file's path
    (options: see :func:`workbench.head_atlas.build_atlas`)."""
    if isinstance(source, str | Path):
        with open_run(source) as run:
            return build_atlas(run, **options)
    return build_atlas(source, **options)


def ioi(model: Model, task: Any = None, **options: Any) -> Circuit:
    """Find the IOI-style circuit of ``model`` (options: see
    :func:`interventions.ioi.find_circuit`: ``n``, ``templates``, ``exact_heads``, ...)."""
    return find_circuit(model, task, **options)


def export_map(
    run: Run | str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    score: str | None = None,
    threshold: float | None = None,
    full_fraction: float | None = None,
    policy: Policy | None = None,
    values: str | None = None,
    index: str | None = None,
) -> list[Path]:
    """Write a run's head map in a serving format (``json``, ``duo``, ``layer-heads``, ``moa``,
    ``head-scores``) into ``out_dir``, as ``workbench export`` does; returns the files.
    ``values`` and ``index`` are the ``duo`` and ``layer-heads`` options of
    :func:`workbench.export.export`."""
    if isinstance(run, Run):
        headmap = HeadMap.from_run(run, policy)
    else:
        with open_run(run) as opened:
            headmap = HeadMap.from_run(opened, policy)
    selection = {"score": score, "threshold": threshold, "full_fraction": full_fraction}
    return export(headmap, fmt, out_dir, **selection, values=values, index=index)
