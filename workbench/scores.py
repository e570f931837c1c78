"""Score tables: one number per (layer, head), with the definition that produced it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import ShapeError


@dataclass
class ScoreTable:
    """A probe's result: ``values`` is ``[n_layers, n_heads]`` float32.

    ``threshold`` (if any) is the value above which a head gets ``label``; ``definition`` says in
    one sentence what the number is and cites its source; ``parameters`` are the knobs used.
    """

    name: str
    values: np.ndarray  # [n_layers, n_heads]
    definition: str
    threshold: float | None = None
    label: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.values.ndim != 2:
            raise ShapeError(
                f"score table {self.name!r} must be [n_layers, n_heads], got {self.values.shape}"
            )

    @property
    def selected(self) -> np.ndarray:
        """``[n_layers, n_heads]`` bool: heads strictly above the threshold."""
        if self.threshold is None:
            return np.zeros(self.values.shape, dtype=bool)
        return self.values > self.threshold

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per head with columns layer, head, score."""
        layers, heads = np.indices(self.values.shape)
        return pd.DataFrame(
            {"layer": layers.ravel(), "head": heads.ravel(), self.name: self.values.ravel()}
        )

    def attrs(self) -> dict[str, Any]:
        """Metadata as HDF5-storable attributes."""
        return {
            "definition": self.definition,
            "threshold": np.nan if self.threshold is None else float(self.threshold),
            "label": self.label or "",
            "parameters": json.dumps(self.parameters, sort_keys=True),
        }

    @classmethod
    def from_attrs(cls, name: str, values: np.ndarray, attrs: Any) -> ScoreTable:
        threshold = float(attrs["threshold"])
        return cls(
            name=name,
            values=values,
            definition=str(attrs["definition"]),
            threshold=None if np.isnan(threshold) else threshold,
            label=str(attrs["label"]) or None,
            parameters=json.loads(attrs["parameters"]),
        )
