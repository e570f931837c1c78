"""Probes: one module per head type. Measured statistics in, score tables [layer, head] out.

Each probe declares the measurements it needs (:class:`probes.base.Measurement`) and turns their
stored statistics into :class:`workbench.scores.ScoreTable` objects whose definitions cite their
source.
"""

from __future__ import annotations

from probes.base import Measurement, Probe, ScanContext
from probes.dormant import DormantProbe
from probes.entropy import EntropyProbe
from probes.positional import PositionalProbe
from probes.retrieval import RetrievalProbe
from probes.sinks import FirstTokenSinkProbe, HiddenSinkProbe, ResidualPeakProbe, ValueDrainProbe
from probes.streaming import StreamingProbe
from workbench.errors import WorkbenchError

PROBES: dict[str, Probe] = {
    p.name: p
    for p in [
        FirstTokenSinkProbe(),
        EntropyProbe(),
        HiddenSinkProbe(),
        ValueDrainProbe(),
        ResidualPeakProbe(),
        DormantProbe(),
        PositionalProbe(),
        StreamingProbe(),
        RetrievalProbe(),
    ]
}


def get_probes(names: str | list[str]) -> list[Probe]:
    """Resolve ``"all"``, ``"sink,entropy"`` or a list of names to probe objects."""
    if isinstance(names, str):
        names = list(PROBES) if names == "all" else [n.strip() for n in names.split(",") if n]
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise WorkbenchError(f"unknown probe(s) {', '.join(unknown)} (known: {', '.join(PROBES)})")
    return [PROBES[n] for n in names]


__all__ = ["PROBES", "Measurement", "Probe", "ScanContext", "get_probes"]
