"""Active-dormant heads: heads that park their attention on the sink on one input domain and do
their job on another (Guo et al. 2024, "Active-Dormant Attention Heads: Mechanistically
Demystifying Extreme-Token Phenomena in LLMs", repo GuoTianYu2000/Active-Dormant-Attention).

Per head and per input domain (default ``prose``, ``code`` and ``synthetic``; see
:mod:`workbench.tasks.domains`; a prompt file works as a domain too) the probe measures

* ``sink_mass``: mean over queries of A[i, 0], the attention parked on the first token;
* ``row_entropy``: their code's ``row_headwise_average_normalized_entropy`` -- each query row's
  entropy divided by log(visible keys), averaged over all rows (the first row, with one visible
  key, counts as 0, as in their code);
* ``column_entropy``: their code's ``column_headwise_maximum_normalized_entropy`` -- each key
  column renormalised over the queries that see it, its entropy divided by log(that number of
  queries), maximum over columns. Pattern path only (a column's entropy needs every A[i, j]; the
  kernels give column sums, not column entropies), so domains measured on the streamed path
  (prompts over 2048 tokens) have no column table.

Their sink-head heuristic is "row entropy below a threshold and column entropy above one"; their
code takes both thresholds as arguments without published values, so the workbench reports the
two entropies per domain and decides dormancy on the sink mass, the quantity the paper's figures
show: a head is **dormant on a domain** when its mean sink mass there exceeds 0.5 (most of its
attention is parked), active otherwise. The ``active_dormant`` score is the flip margin
``min(max_d m_d − 0.5, 0.5 − min_d m_d)`` over the domains' sink masses m_d: positive exactly when
the head is dormant on one domain and active on another. A head is labelled **active-dormant**
when the margin exceeds 0.1 (sink mass above 0.6 on one domain, below 0.4 on another), so that a
head hovering at 0.5 is not called a flip; the workbench's choice, like the 0.5.

Options: ``dormant_domains`` (comma list, default ``prose,code,synthetic``), ``dormant_prompts``
(4 per domain), ``dormant_tokens`` (256), ``dormant_seed`` (0, for ``synthetic``).
:func:`domain_table` turns a result into the per-domain table, :func:`domain_figure` plots it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from probes.basic import as_numpy, decode
from workbench.capture import resolve_path, run_streamed, run_with_patterns
from workbench.probe import Measurement, ScanContext
from workbench.scores import ScoreTable
from workbench.tasks.domains import DOMAINS, domain_inputs

if TYPE_CHECKING:
    import plotly.graph_objects as go

DORMANT_THRESHOLD = 0.5
FLIP_MARGIN = 0.1  # active_dormant label: > 0.6 on one domain and < 0.4 on another
PREFIX = "dormant_"  # measurement keys are dormant_<domain>
DEFINITIONS = {
    "sink_mass": "mean over queries of A[i, 0] (attention parked on the first token)",
    "row_entropy": "mean over rows of entropy_i / log(visible keys), row 0 counted as 0 "
    "(Guo et al.'s row_headwise_average_normalized_entropy)",
    "column_entropy": "max over key columns of the column-normalised entropy / log(queries "
    "seeing the key) (Guo et al.'s column_headwise_maximum_normalized_entropy)",
}


def row_entropy(pattern: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[head]`` mean row-normalised entropy of ``pattern [head, q_pos, k_pos]`` (Guo et al.)."""
    n = pattern.shape[-1]
    p = pattern.float()
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)  # [head, q_pos]
    return (entropy / visible_log(n, causal, pattern.device)).mean(-1)


def visible_log(n: int, causal: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[q_pos]`` log(visible keys), with +inf where that is log 1 = 0 (the row then counts 0)."""
    visible = (
        torch.arange(1, n + 1, device=device) if causal else torch.full((n,), n, device=device)
    )
    norm = visible.float().log()
    return torch.where(norm > 0, norm, torch.inf)


def column_entropy(pattern: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[head]`` max over key columns of the column-normalised entropy (Guo et al.)."""
    n = pattern.shape[-1]
    p = pattern.float()
    column = p / p.sum(-2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    entropy = -(column * torch.where(column > 0, column.log(), 0.0)).sum(-2)  # [head, k_pos]
    seeing = torch.arange(n, 0, -1, device=p.device) if causal else torch.full((n,), n)
    norm = seeing.to(p.device).float().log()
    return torch.where(norm > 0, entropy / norm.clamp_min(1e-30), 0.0).max(-1).values


def domain_statistics(
    model, token_ids: torch.Tensor, *, path: str = "auto", columns: bool = True
) -> dict[str, np.ndarray]:
    """``{sink_mass, row_entropy[, column_entropy]}``, each ``[n_layers, n_heads]``."""
    n = int(token_ids.numel())
    causal = model.info.causal
    if resolve_path(path, n) == "pattern":
        per_layer: list[dict[str, torch.Tensor]] = [{}] * model.info.n_layers

        def on_pattern(layer: int, pattern: torch.Tensor) -> None:  # [head, q_pos, k_pos]
            stats = {
                "sink_mass": pattern[:, :, 0].mean(-1),
                "row_entropy": row_entropy(pattern, causal),
            }
            if columns:
                stats["column_entropy"] = column_entropy(pattern, causal)
            per_layer[layer] = stats

        run_with_patterns(model, token_ids, on_pattern)
        return {k: as_numpy(torch.stack([s[k] for s in per_layer])) for k in per_layer[0]}
    rec = run_streamed(model, token_ids, sink_size=1)
    norm = visible_log(n, causal)  # [q_pos]
    return {
        "sink_mass": as_numpy(torch.stack([s.sink_mass[0].mean(-1) for s in rec.stats])),
        "row_entropy": as_numpy(torch.stack([(s.entropy[0] / norm).mean(-1) for s in rec.stats])),
    }


@dataclass(frozen=True)
class DormantProbe:
    name: str = "dormant"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        measurements = []
        for spec in ctx.option("dormant_domains", DOMAINS):
            domain, token_ids = domain_inputs(
                ctx.model.tokenizer,
                spec,
                n_prompts=ctx.option("dormant_prompts", 4),
                n_tokens=ctx.option("dormant_tokens", 256),
                seed=ctx.option("dormant_seed", 0),
            )
            columns = all(resolve_path(ctx.path, len(ids)) == "pattern" for ids in token_ids)
            definitions = {k: f"{v} ({domain})" for k, v in DEFINITIONS.items()}
            if not columns:
                del definitions["column_entropy"]
            measurements.append(
                Measurement(
                    key=PREFIX + domain,
                    texts=[decode(ctx.model.tokenizer, ids) for ids in token_ids],
                    token_ids=token_ids,
                    definitions=definitions,
                    measure=lambda i, ids=token_ids, c=columns: domain_statistics(
                        ctx.model, torch.as_tensor(ids[i]), path=ctx.path, columns=c
                    ),
                )
            )
        return measurements

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        domains = [key.removeprefix(PREFIX) for key in stats if key.startswith(PREFIX)]
        tables, masses = [], []
        for domain in domains:
            s = stats[PREFIX + domain]
            masses.append(s["sink_mass"])  # [n_prompts, n_layers, n_heads]
            tables.append(
                ScoreTable.from_items(
                    name=f"sink_mass_{domain}",
                    per_item=s["sink_mass"],
                    definition=f"mean attention on the first token over queries of {domain} "
                    "prompts; dormant on the domain above 0.5 (Guo et al. 2024)",
                    threshold=DORMANT_THRESHOLD,
                    label=f"dormant_{domain}",
                    parameters={"per_item": f"{PREFIX}{domain}/sink_mass"},
                )
            )
            for entropy in ("row_entropy", "column_entropy"):
                if entropy in s:
                    tables.append(
                        ScoreTable.from_items(
                            name=f"{entropy}_{domain}",
                            per_item=s[entropy],
                            definition=DEFINITIONS[entropy] + f", {domain} prompts",
                        )
                    )
        if len(masses) >= 2:
            tables.append(
                ScoreTable.from_items(
                    name="active_dormant",
                    per_item=masses,
                    combine=flip_margin,
                    definition="flip margin min(max_d m_d - 0.5, 0.5 - min_d m_d) of the sink "
                    f"mass m_d over domains {', '.join(domains)}; > 0: dormant on one domain, "
                    "active on another (Guo et al. 2024); labelled above 0.1",
                    threshold=FLIP_MARGIN,
                    label="active_dormant",
                    parameters={"domains": domains, "dormant_threshold": DORMANT_THRESHOLD},
                )
            )
        return tables


def flip_margin(masses: list[np.ndarray]) -> np.ndarray:
    """``min(max_d m_d - 0.5, 0.5 - min_d m_d)`` of the domains' mean sink masses ``m_d``
    (each ``[..., n_layers, n_heads]``; the bootstrap passes resampled means with a leading
    resample axis)."""
    stacked = np.stack(masses)  # [domain, ..., layer, head]
    return np.minimum(stacked.max(0) - DORMANT_THRESHOLD, DORMANT_THRESHOLD - stacked.min(0))


def domain_table(tables: dict[str, ScoreTable]) -> pd.DataFrame:
    """Per-head table over domains from a scan's tables (``ScanResult.tables``): layer, head,
    ``sink_mass_<d>`` and ``dormant_<d>`` per domain, ``active_dormant`` (margin), and
    ``dormant_on`` / ``active_on`` (comma lists)."""
    domains = [n.removeprefix("sink_mass_") for n in tables if n.startswith("sink_mass_")]
    if not domains:
        raise KeyError("no sink_mass_<domain> tables: run the 'dormant' probe")
    first = tables[f"sink_mass_{domains[0]}"].values
    layers, heads = np.indices(first.shape)
    frame = pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel()})
    for d in domains:
        frame[f"sink_mass_{d}"] = tables[f"sink_mass_{d}"].values.ravel()
        frame[f"dormant_{d}"] = frame[f"sink_mass_{d}"] > DORMANT_THRESHOLD
    if "active_dormant" in tables:
        frame["active_dormant"] = tables["active_dormant"].values.ravel()
    frame["dormant_on"] = [
        ",".join(d for d in domains if row[f"dormant_{d}"]) for _, row in frame.iterrows()
    ]
    frame["active_on"] = [
        ",".join(d for d in domains if not row[f"dormant_{d}"]) for _, row in frame.iterrows()
    ]
    return frame


def domain_figure(tables: dict[str, ScoreTable], model_name: str = "") -> go.Figure:
    """Sink mass per head on each domain (x = head as 'L.H', one trace per domain), the dormant
    threshold drawn across."""
    import plotly.graph_objects as go  # lazy: scans run where plotly is not installed

    frame = domain_table(tables)
    names = [f"{layer}.{head}" for layer, head in zip(frame["layer"], frame["head"], strict=True)]
    fig = go.Figure()
    for column in [c for c in frame.columns if c.startswith("sink_mass_")]:
        fig.add_trace(
            go.Scatter(
                x=names, y=frame[column], mode="markers", name=column.removeprefix("sink_mass_")
            )
        )
    fig.add_hline(y=DORMANT_THRESHOLD, line_dash="dash", annotation_text="dormant above")
    fig.update_layout(
        title=f"{model_name} sink mass per domain".strip(),
        xaxis_title="layer.head",
        yaxis_title="mean attention on the first token",
    )
    return fig
