"""Attention entropy per head (row-normalised, as in Guo et al. 2024's sink-head heuristic,
repo GuoTianYu2000/Active-Dormant-Attention).

For each query row, entropy H_i = -Σ_j A[i, j] log A[i, j] divided by log(number of visible keys),
so 1 means uniform attention and 0 attention on a single key. The score is the mean over queries
(with at least two visible keys) and prompts. It is descriptive: low values mark heads that
concentrate on few keys (sinks, previous-token heads); the active-dormant probe combines it with
the sink mass per domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probes.basic import BASIC, basic_measurement
from workbench.probe import Measurement, ScanContext
from workbench.scores import ScoreTable


@dataclass(frozen=True)
class EntropyProbe:
    name: str = "entropy"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        return [basic_measurement(ctx)]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        table = ScoreTable.from_items(
            name=self.name,
            per_item=stats[BASIC]["normalized_entropy"],
            definition="mean row-normalised attention entropy H_i / log(visible keys) over "
            "queries and prompts (Guo et al. 2024); 1 = uniform, 0 = a single key",
        )
        return [table]
