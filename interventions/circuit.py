"""The :class:`Circuit` object: heads with their classes, edges, metrics; JSON round trip, a plotly
graph, storage in a run file, faithfulness checks and the overlap of two circuits.

Faithfulness follows Wang et al. 2022 §4 (arXiv:2211.00593): every head *outside* the circuit
writes its mean output over the reference (ABC) prompts of the same template at the same position,
and the circuit's logit difference F(C) is compared with the model's F(M). Reported:

* ``faithfulness`` = F(C) / F(M) (the paper: 87 % for GPT-2 small's circuit);
* ``faithfulness_normalized`` = (F(C) - F(∅)) / (F(M) - F(∅)), with F(∅) every head ablated;
* ``faithfulness_class_circuit``: the same for the heads the class rules chose (without the
  heads admitted because they make the circuit more faithful, :func:`interventions.ioi.
  build_circuit`);
* ``faithfulness_complement`` = F(M \\ C) / F(M): the circuit ablated, every other head intact
  (the paper's "knock out the circuit"; small when the circuit carries the task);
* completeness (their §4.2): for a subset K of the circuit, ``|F(C \\ K) - F(M \\ K)| / F(M)``
  should be small; checked for K = each class and a few seeded random halves;
* minimality (§4.3, with K = ∅): per head v, the drop in faithfulness when v leaves the circuit,
  ``(F(C) - F(C \\ {v})) / F(M)``, which should be clearly positive for every head.

The overlap of two circuits (Merullo et al. 2023, "Circuit component reuse across tasks":
~78 % of in-circuit heads shared between IOI and Colored Objects in GPT-2 medium) is reported as
the shared heads, their share of each circuit and the Jaccard index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from interventions import path_patching as pp
from workbench.atomic import atomic_write_text
from workbench.errors import InterventionError
from workbench.figures import circuit_graph
from workbench.models import Model, ModelInfo
from workbench.store import open_run, write_circuit
from workbench.tasks.templated import TaskDataset

CIRCUIT_SCHEMA = "attention-head-workbench/circuit"
CIRCUIT_SCHEMA_VERSION = 1


@dataclass
class CircuitHead:
    """A head of the circuit: ``role`` is its class; ``evidence`` the numbers that put it there."""

    layer: int
    head: int
    role: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.head}"


@dataclass
class CircuitEdge:
    """``sender`` affects ``receiver`` (a head ``"l.h"`` or ``"logits"``) through ``via`` (q, k,
    v or the direct path); ``effect`` is the path-patching effect relative to the clean logit
    difference (measured on the receiver's whole class at once)."""

    sender: str
    receiver: str
    via: str
    effect: float | None


@dataclass
class Circuit:
    """A circuit found in one model on one task. ``evidence``: the per-head evidence of *every*
    head (one dict per head), kept so a viewer can show why a head is in or out."""

    model: dict[str, Any]
    task: dict[str, Any]
    heads: list[CircuitHead]
    edges: list[CircuitEdge] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    evidence: list[dict[str, Any]] = field(default_factory=list)

    # -- views ---------------------------------------------------------------------------------

    @property
    def head_set(self) -> set[tuple[int, int]]:
        return {(h.layer, h.head) for h in self.heads}

    def by_class(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for h in sorted(self.heads, key=lambda h: (h.layer, h.head)):
            out.setdefault(h.role, []).append((h.layer, h.head))
        return out

    def to_pandas(self) -> pd.DataFrame:
        """One row per circuit head: layer, head, class and its key evidence."""
        keys = [
            "dla",
            "direct_effect",
            "act_patch",
            "end_io",
            "end_s2",
            "s2_s1",
            "s2_s1p1",
            "s1p1_s1",
            "pp_nm_q",
            "pp_sinh_v",
            "pp_ind_k",
            "backup_gain",
        ]
        rows = [
            {
                "layer": h.layer,
                "head": h.head,
                "class": h.role,
                **{k: h.evidence.get(k) for k in keys},
            }
            for h in sorted(self.heads, key=lambda h: (h.layer, h.head))
        ]
        return pd.DataFrame(rows, columns=["layer", "head", "class", *keys])

    def classes_table(self) -> str:
        """Plain-text table: each class, its heads and how many."""
        lines = [f"{'class':<22}{'n':>3}  heads"]
        for role, heads in self.by_class().items():
            lines.append(f"{role:<22}{len(heads):>3}  " + " ".join(f"{a}.{b}" for a, b in heads))
        return "\n".join(lines)

    def summary(self) -> str:
        m = self.metrics
        parts = [
            f"{self.model.get('name', '?')} on {self.task.get('task', '?')} "
            f"({self.task.get('n_prompts', '?')} prompts, seed {self.task.get('seed', '?')})",
            f"logit diff clean {m.get('clean_logit_diff', float('nan')):.3f}, "
            f"ABC {m.get('abc_logit_diff', float('nan')):.3f}, "
            f"accuracy {m.get('clean_accuracy', float('nan')):.3f}",
        ]
        if "faithfulness" in m:
            parts.append(
                f"circuit ({len(self.heads)} heads) keeps {m['faithfulness']:.1%} of the logit "
                f"difference (normalized {m['faithfulness_normalized']:.1%}); "
                f"F(C) {m['circuit_logit_diff']:.3f}, F(empty) {m['empty_logit_diff']:.3f}"
            )
        if "faithfulness_class_circuit" in m:
            parts.append(
                f"class circuit ({m['class_circuit_heads']} heads the class rules chose): "
                f"{m['faithfulness_class_circuit']:.1%}; complement (the circuit ablated): "
                f"{m['faithfulness_complement']:.1%}"
            )
        for step in m.get("greedy", []):
            parts.append(
                f"admitted {step['head']} ({step['class']}): faithfulness "
                f"{step['before']:.1%} -> {step['after']:.1%}"
            )
        for left in m.get("left_out", []):
            parts.append(
                f"left out {left['head']} ({left['class']}): would give "
                f"{left['faithfulness_if_added']:.1%}"
            )
        if "minimality" in m:
            parts.append(
                "minimality (drop in faithfulness without the head): "
                + ", ".join(f"{h} {v:+.1%}" for h, v in m["minimality"].items())
            )
        return "\n".join([*parts, self.classes_table()])

    def __repr__(self) -> str:
        return (
            f"Circuit({self.model.get('name')!r}, {self.task.get('task')!r}, "
            f"{len(self.heads)} heads, {len(self.edges)} edges)"
        )

    def _repr_html_(self) -> str:
        return f"<pre>{self.summary()}</pre>" + self.to_pandas().to_html(index=False)

    def plot(self) -> go.Figure:
        """The circuit as a directed graph (:func:`workbench.figures.circuit_graph`, the
        explorer's Circuit page): each head at (its head index, its layer) in its class colour,
        the logits on top, one arrow per path coloured by q/k/v/direct and as wide as its
        effect; nodes carry ``customdata`` ``(layer, head)`` for clicks."""
        title = f"{self.task.get('task', '')} circuit of {self.model.get('name', '')}"
        return circuit_graph(self.heads, self.edges, title=title)

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CIRCUIT_SCHEMA,
            "schema_version": CIRCUIT_SCHEMA_VERSION,
            "model": self.model,
            "task": self.task,
            "heads": [asdict(h) for h in self.heads],
            "edges": [asdict(e) for e in self.edges],
            "metrics": self.metrics,
            "rules": self.rules,
            "notes": self.notes,
            "evidence": self.evidence,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        if not isinstance(data, dict) or data.get("schema") != CIRCUIT_SCHEMA:
            raise InterventionError("not a workbench circuit (missing or wrong 'schema')")
        if data.get("schema_version") != CIRCUIT_SCHEMA_VERSION:
            raise InterventionError(
                f"circuit schema version {data.get('schema_version')}; this workbench reads "
                f"{CIRCUIT_SCHEMA_VERSION}"
            )
        try:
            return cls(
                model=data["model"],
                task=data["task"],
                heads=[CircuitHead(**h) for h in data["heads"]],
                edges=[CircuitEdge(**e) for e in data["edges"]],
                metrics=data.get("metrics", {}),
                rules=data.get("rules", {}),
                notes=data.get("notes", []),
                evidence=data.get("evidence", []),
            )
        except (KeyError, TypeError) as e:  # a field missing, or one of another shape
            raise InterventionError(f"circuit JSON lacks or misshapes a field ({e!r})") from None

    @classmethod
    def from_json(cls, text: str) -> Circuit:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # not JSON, too many digits, too deep
            raise InterventionError(f"circuit JSON does not parse: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically."""
        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        path = Path(path)
        if not path.is_file():
            raise InterventionError(f"no such circuit file: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise InterventionError(f"cannot read circuit file {path}: {e}") from None
        return cls.from_json(text)

    def store(self, run_path: str | Path, name: str | None = None) -> Path:
        """Store in a run file under ``/circuits/<name>`` (default: the task name)."""
        info = ModelInfo(**self.model)
        return write_circuit(
            run_path, name or str(self.task.get("task", "circuit")), self.to_json(), info
        )

    @classmethod
    def from_run(cls, run_path: str | Path, name: str) -> Circuit:
        with open_run(run_path) as run:
            return cls.from_json(run.circuit(name))


def overlap(a: Circuit, b: Circuit) -> dict[str, Any]:
    """Head overlap of two circuits (e.g. IOI vs Colored Objects in one model)."""
    sa, sb = a.head_set, b.head_set
    shared = sa & sb
    union = sa | sb
    role_b = {(h.layer, h.head): h.role for h in b.heads}
    same_class = [h for h in a.heads if role_b.get((h.layer, h.head)) == h.role]
    return {
        "a": a.task.get("task"),
        "b": b.task.get("task"),
        "n_a": len(sa),
        "n_b": len(sb),
        "shared": sorted(shared),
        "n_shared": len(shared),
        "share_of_a": len(shared) / len(sa) if sa else float("nan"),
        "share_of_b": len(shared) / len(sb) if sb else float("nan"),
        "jaccard": len(shared) / len(union) if union else float("nan"),
        "n_same_class": len(same_class),
    }


# -- faithfulness ------------------------------------------------------------------------------


Head = tuple[int, int]


def ablation_scorer(
    model: Model, clean: TaskDataset, abc: TaskDataset
) -> Callable[[Iterable[Head]], float]:
    """``F(K)``: the mean logit difference on ``clean`` with every head *outside* ``K``
    mean-ablated (template-wise mean over the ABC prompts, per position, of its ``z``); the
    means are computed once."""
    info = model.info
    means = pp.position_means(pp.record(model, abc, patterns=False).z, clean.groups)

    def score(kept: Iterable[Head]) -> float:
        replaced = torch.ones(info.n_layers, info.n_heads, dtype=torch.bool)
        for layer, head in kept:
            replaced[layer, head] = False
        return float(pp.run_with_replaced_heads(model, clean, means, replaced).mean())

    return score


def faithfulness(
    model: Model,
    clean: TaskDataset,
    abc: TaskDataset,
    circuit: Circuit,
    checks: bool = True,
    n_random: int = 3,
    seed: int = 0,
    class_heads: Iterable[Head] | None = None,
    scorer: Callable[[Iterable[Head]], float] | None = None,
) -> dict[str, Any]:
    """Mean-ablate every head outside ``circuit`` (template-wise ABC mean by position) and report
    the share of the logit difference kept, that of ``class_heads`` (the heads the class rules
    chose; default the whole circuit) and that of the complement, plus completeness and
    minimality with ``checks`` (module docstring). ``scorer``: an :func:`ablation_scorer` of the
    same prompts, to reuse its means."""
    info = model.info
    f = scorer or ablation_scorer(model, clean, abc)
    every = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    members = sorted(circuit.head_set)
    chosen = sorted(set(members if class_heads is None else class_heads))
    f_model, f_circuit, f_empty = f(every), f(members), f([])
    f_complement = f(sorted(set(every) - set(members)))
    out: dict[str, Any] = {
        "model_logit_diff": f_model,
        "circuit_logit_diff": f_circuit,
        "empty_logit_diff": f_empty,
        "faithfulness": f_circuit / f_model,
        "faithfulness_normalized": (f_circuit - f_empty) / (f_model - f_empty),
        "class_circuit_heads": len(chosen),
        "faithfulness_class_circuit": f(chosen) / f_model,
        "complement_logit_diff": f_complement,
        "faithfulness_complement": f_complement / f_model,
        "ablation": "template-wise mean over the ABC prompts, per position, of each head's z",
    }
    if not checks or not circuit.heads:
        return out
    subsets: dict[str, list[Head]] = dict(circuit.by_class())
    rng = np.random.default_rng(seed)
    for i in range(n_random if len(members) > 1 else 0):
        pick = rng.choice(len(members), size=len(members) // 2, replace=False)
        subsets[f"random half {i}"] = [members[j] for j in sorted(pick)]
    completeness = {}
    for name, heads in subsets.items():
        f_c_k = f(sorted(set(members) - set(heads)))
        f_m_k = f(sorted(set(every) - set(heads)))
        completeness[name] = {
            "F(C\\K)": f_c_k,
            "F(M\\K)": f_m_k,
            "gap": abs(f_c_k - f_m_k) / abs(f_model),
        }
    out["completeness"] = completeness
    out["completeness_max_gap"] = max(c["gap"] for c in completeness.values())
    out["minimality"] = {
        f"{layer}.{head}": (f_circuit - f([h for h in members if h != (layer, head)])) / f_model
        for layer, head in members
    }
    return out
