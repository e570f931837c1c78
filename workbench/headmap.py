"""HeadMap: what each head is, in one portable object.

A HeadMap joins a run's score tables into per-head records ``{layer, head, kv_head, labels,
scores}``, keeps each probe's definition, threshold and dataset (provenance), and carries the
serving *policy*: which label keeps the full KV cache, the sink and recent-window sizes for the
other heads, and how query heads map to KV heads.

Label rule (one place, documented): a head carries label ``t.label`` for every score table ``t``
with a threshold when ``t.values[layer, head] > t.threshold``. A head can carry several labels.

GQA rule: serving stacks keep or evict KV per *KV head*, shared by ``group_size`` query heads
(query head ``h`` reads KV head ``h // group_size``, the Hugging Face ``repeat_kv`` order). A KV
head's score is the ``max`` (default; keep a group full if any of its query heads needs it) or
the ``mean`` of its query heads' scores.

The canonical form is JSON validated by ``workbench/schemas/headmap-v1.schema.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.atomic import atomic_write_text
from workbench.errors import WorkbenchError
from workbench.models import ModelInfo
from workbench.scores import ScoreTable
from workbench.store import Run

HEADMAP_SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "headmap-v1.schema.json"
GQA_RULES = ("max", "mean")


class HeadMapError(WorkbenchError, ValueError):
    """A HeadMap file is invalid, or a selection cannot be made."""


@dataclass
class Policy:
    """How a serving stack should use the map."""

    full_label: str = "retrieval"  # heads with this label keep the full KV cache
    sink_size: int = 4  # initial tokens every other head keeps (StreamingLLM's 4)
    recent_size: int = 256  # recent window every other head keeps (DuoAttention's 256)
    gqa_rule: str = "max"  # query-head scores -> KV-head score

    def __post_init__(self) -> None:
        if self.gqa_rule not in GQA_RULES:
            raise HeadMapError(f"gqa_rule must be one of {GQA_RULES}, got {self.gqa_rule!r}")
        if self.sink_size < 0 or self.recent_size < 0:
            raise HeadMapError("sink_size and recent_size must be >= 0")


@dataclass
class HeadMap:
    model: ModelInfo
    tables: dict[str, ScoreTable]
    policy: Policy = field(default_factory=Policy)
    datasets: dict[str, str] = field(default_factory=dict)  # probe -> inputs it was measured on
    per_item: dict[str, np.ndarray] = field(default_factory=dict)  # score -> [n_items, L, H]

    @classmethod
    def from_run(cls, run: Run, policy: Policy | None = None) -> HeadMap:
        """Build from an open run file; per-item scores come along when a table names them."""
        tables = {name: run.score(name) for name in run.score_names}
        datasets, per_item = {}, {}
        for name, table in tables.items():
            source = table.parameters.get("per_item")  # "measurement/statistic"
            if source:
                key, stat = source.split("/", 1)
                datasets[name] = f"{key} ({run.n_items(key)} items)"
                per_item[name] = run.stat(key, stat)
            else:
                datasets[name] = ", ".join(
                    f"{m} ({run.n_items(m)} items)" for m in run.measurement_names
                )
        return cls(run.model, tables, policy or Policy(), datasets, per_item)

    # -- per head ------------------------------------------------------------------------------

    def labels(self) -> dict[str, np.ndarray]:
        """``{label: [n_layers, n_heads] bool}`` by the label rule in the module docstring."""
        out: dict[str, np.ndarray] = {}
        for table in self.tables.values():
            if table.label and table.threshold is not None:
                out[table.label] = out.get(table.label, False) | table.selected
        return out

    def heads(self) -> list[dict[str, Any]]:
        labels = self.labels()
        rows = []
        for layer in range(self.model.n_layers):
            for head in range(self.model.n_heads):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "kv_head": self.model.kv_head(head),
                        "labels": sorted(k for k, mask in labels.items() if mask[layer, head]),
                        "scores": {
                            name: _finite(t.values[layer, head]) for name, t in self.tables.items()
                        },
                    }
                )
        return rows

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.heads())
        scores = pd.DataFrame(list(frame.pop("scores")))
        frame["labels"] = frame["labels"].map(",".join)
        return pd.concat([frame, scores], axis=1)

    def kv_scores(self, name: str, rule: str | None = None) -> np.ndarray:
        """``[n_layers, n_kv_heads]``: a score aggregated over each KV head's query heads."""
        rule = rule or self.policy.gqa_rule
        if rule not in GQA_RULES:
            raise HeadMapError(f"GQA rule must be one of {GQA_RULES}, got {rule!r}")
        values = self.table(name).values  # [n_layers, n_heads]
        grouped = values.reshape(self.model.n_layers, self.model.n_kv_heads, -1)
        return grouped.max(-1) if rule == "max" else grouped.mean(-1)

    def table(self, name: str) -> ScoreTable:
        if name not in self.tables:
            raise HeadMapError(f"no score {name!r} in this map (has: {', '.join(self.tables)})")
        return self.tables[name]

    # -- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "attention-head-workbench/headmap",
            "schema_version": HEADMAP_SCHEMA_VERSION,
            "model": self.model.to_dict(),
            "policy": asdict(self.policy),
            "probes": {
                name: {
                    "definition": t.definition,
                    "threshold": t.threshold,
                    "label": t.label,
                    "parameters": t.parameters,
                    "dataset": self.datasets.get(name, ""),
                }
                for name, t in self.tables.items()
            },
            "heads": self.heads(),
        }

    def save(self, path: str | Path) -> Path:
        document = self.to_json()
        validate(document)
        return atomic_write_text(Path(path), json.dumps(document, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HeadMap:
        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise HeadMapError(f"no such HeadMap file: {path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HeadMapError(f"{path} is not JSON: {e}") from e
        validate(document, source=str(path))
        return cls.from_json(document)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> HeadMap:
        info = ModelInfo(**document["model"])
        shape = (info.n_layers, info.n_heads)
        heads = document["heads"]
        if len(heads) != shape[0] * shape[1]:
            raise HeadMapError(f"expected {shape[0] * shape[1]} heads, found {len(heads)}")
        tables = {}
        for name, probe in document["probes"].items():
            values = np.full(shape, np.nan, dtype=np.float32)
            for h in heads:
                score = h["scores"].get(name)
                values[h["layer"], h["head"]] = np.nan if score is None else score
            tables[name] = ScoreTable(
                name,
                values,
                probe["definition"],
                probe["threshold"],
                probe["label"],
                probe["parameters"],
            )
        datasets = {name: p["dataset"] for name, p in document["probes"].items()}
        return cls(info, tables, Policy(**document["policy"]), datasets)


def validate(document: dict[str, Any], source: str = "HeadMap") -> None:
    """Check a HeadMap document against the committed JSON schema."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(document, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise HeadMapError(f"{source} is not a valid HeadMap at {where}: {e.message}") from e


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)
