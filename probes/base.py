"""The probe interface.

A probe declares *measurements* (inputs plus a function that turns one input into per-head
statistics) and turns the stored statistics into score tables. The scan runs the measurements,
checkpoints them in the run file (so a stopped scan resumes) and calls :meth:`Probe.score`.
Probes that share a measurement key share its work: ``sink`` and ``entropy`` both read the
``basic`` statistics of the scan's prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from workbench.errors import ProbeOptionError
from workbench.models import Model
from workbench.scores import ScoreTable
from workbench.tasks import PromptSet


@dataclass
class ScanContext:
    """What every probe may read: the model, the scan's prompts and the scan's options."""

    model: Model
    prompts: PromptSet
    max_tokens: int | None = None
    path: str = "auto"  # capture path: "auto", "pattern" or "streamed"
    options: dict[str, Any] = field(default_factory=dict)  # probe-specific, e.g. lengths

    def option(self, name: str, default: Any) -> Any:
        """Option ``name`` converted to the type of ``default`` (bool, int, float, str, or a
        tuple of str for a tuple default; a comma list or a single string is accepted there).

        Raises:
            ProbeOptionError: the value does not convert.
        """
        value = self.options.get(name, default)
        try:
            if isinstance(default, bool):
                if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                    return value.lower() in ("true", "1")
                if isinstance(value, bool | int):
                    return bool(value)
                raise ValueError(value)
            if isinstance(default, tuple):
                items = value.split(",") if isinstance(value, str) else list(value)
                return tuple(str(v).strip() for v in items if str(v).strip())
            return type(default)(value)
        except (TypeError, ValueError):
            raise ProbeOptionError(
                f"option {name}={value!r}: expected {type(default).__name__} (default {default!r})"
            ) from None

    def token_ids(self) -> list[np.ndarray]:
        """The scan's prompts tokenized, each ``[seq]``."""
        return [self.model.tokenize(t, self.max_tokens).numpy() for t in self.prompts.texts]


@dataclass
class Measurement:
    """Inputs and the per-item function whose results the run file stores under ``key``.

    ``measure(i)`` returns ``{statistic: array}`` for item ``i``; each statistic keeps one shape
    across items (usually ``[n_layers, n_heads]``). ``definitions`` documents every statistic.
    """

    key: str
    texts: list[str]
    token_ids: list[np.ndarray]
    definitions: dict[str, str]
    measure: Callable[[int], dict[str, np.ndarray]]


class Probe(Protocol):
    name: str

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        """The measurements this probe needs (keys shared with other probes are run once)."""
        ...

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        """``stats[key][statistic]``: ``[n_items, ...]``; returns ``[n_layers, n_heads]`` tables."""
        ...
