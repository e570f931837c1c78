"""The probe interface."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from workbench.scores import ScoreTable


class Probe(Protocol):
    name: str
    #: per-prompt statistics the probe reads, names from workbench.capture.STATISTICS
    statistics: tuple[str, ...]

    def score(self, stats: dict[str, np.ndarray]) -> ScoreTable:
        """``stats[name]``: ``[n_prompts, n_layers, n_heads]``; returns ``[n_layers, n_heads]``."""
        ...
