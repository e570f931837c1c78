"""Probes: one module per head type. Measured statistics in, score tables [layer, head] out.

Each probe declares the measurements it needs (:class:`workbench.probe.Measurement`) and turns
their stored statistics into :class:`workbench.scores.ScoreTable` objects whose definitions cite
their source. The probe API (``Measurement``, ``Probe``, ``ScanContext``) lives in the core,
:mod:`workbench.probe`, and is re-exported here.
"""

from __future__ import annotations

import difflib

from probes.dormant import DormantProbe
from probes.entropy import EntropyProbe
from probes.positional import PositionalProbe
from probes.retrieval import RetrievalProbe
from probes.sinks import FirstTokenSinkProbe, HiddenSinkProbe, ResidualPeakProbe, ValueDrainProbe
from probes.streaming import StreamingProbe
from workbench.errors import WorkbenchError
from workbench.probe import Measurement, Probe, ScanContext

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


# What a scan runs unless told otherwise: the probes that measure the scan's own prompts. The
# others build their own inputs (needle grids, domain corpora, repeated random tokens) and cost
# more; ask for them by name or with "all".
DEFAULT_PROBES: tuple[str, ...] = ("sink", "entropy", "hidden_sink", "value_drain", "residual_peak")


def get_probes(names: str | list[str]) -> list[Probe]:
    """Resolve ``"default"``, ``"all"``, ``"sink,entropy"`` or a list of names to probes."""
    if isinstance(names, str):
        groups = {"all": list(PROBES), "default": list(DEFAULT_PROBES)}
        names = groups.get(names) or [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise WorkbenchError(f"no probe named; choose from default, all, {', '.join(PROBES)}")
    unknown = [n for n in names if not isinstance(n, str) or n not in PROBES]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(PROBES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise WorkbenchError(
            f"unknown probe(s) {', '.join(map(str, unknown))}{hint} (known: {', '.join(PROBES)})"
        )
    return [PROBES[n] for n in names]


__all__ = ["DEFAULT_PROBES", "PROBES", "Measurement", "Probe", "ScanContext", "get_probes"]
