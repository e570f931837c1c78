"""Probes: one module per head type. Captured statistics in, a score table [layer, head] out.

Each probe names the per-prompt statistics it needs (see :data:`workbench.capture.STATISTICS`),
and turns them into a :class:`workbench.scores.ScoreTable` whose definition cites its source.
"""

from __future__ import annotations

from probes.base import Probe
from probes.entropy import EntropyProbe
from probes.sinks import FirstTokenSinkProbe
from workbench.errors import WorkbenchError

PROBES: dict[str, Probe] = {p.name: p for p in [FirstTokenSinkProbe(), EntropyProbe()]}


def get_probes(names: str | list[str]) -> list[Probe]:
    """Resolve ``"all"``, ``"sink,entropy"`` or a list of names to probe objects."""
    if isinstance(names, str):
        names = list(PROBES) if names == "all" else [n.strip() for n in names.split(",") if n]
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise WorkbenchError(f"unknown probe(s) {', '.join(unknown)} (known: {', '.join(PROBES)})")
    return [PROBES[n] for n in names]


__all__ = ["PROBES", "Probe", "get_probes"]
