"""Streaming-head proxy: how much attention a head would lose under a sinks + recent-window cache.

DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads", repo mit-han-lab/duo-attention) splits heads into *retrieval*
heads, which keep the full KV cache, and *streaming* heads, which keep only the first
``sink_size`` tokens (StreamingLLM's attention sinks) plus the ``recent_size`` most recent ones.
DuoAttention learns a gate per KV head by optimisation; this probe measures the quantity the gate
stands for, directly: for query i at position p_i, the mass outside sinks + window,

    outside_i = Σ_{S <= j <= p_i − W} A[i, j]      (S = sink_size, W = recent_size),

the attention a streaming cache would evict (:data:`kernels.reference` defines it; the kernels
compute it without forming the pattern). Only queries with p_i >= S + W can lose anything, so the
score of a head is the mean of outside_i over those queries, averaged over prompts. A head is
labelled ``long_range`` (it needs the full cache) when the score exceeds 0.1, i.e. a streaming
cache would drop more than a tenth of its attention; this threshold is the workbench's choice
(DuoAttention keeps the heads above a quantile of its gates instead; ``workbench export`` can
select by quantile from this table too).

Inputs: ``streaming_prompts`` (default 2) cuts of ``streaming_tokens`` tokens (default 1024) of
the domain ``streaming_domain`` (default ``prose``, or a prompt file; see
:func:`workbench.tasks.domains.domain_inputs`). ``streaming_sink`` and ``streaming_recent``
default to the HeadMap policy's 4 and 256 (:class:`workbench.headmap.Policy`), so the label
matches the cache the export describes. Both capture paths give the statistic: the pattern path
reduces ``hook_pattern`` with :func:`kernels.stats_from_pattern`, the streamed path asks the
kernels for the outside mass of the queries at p_i >= S + W only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels import stats_from_pattern
from probes.basic import as_numpy, decode
from workbench.capture import resolve_path, run_streamed, run_with_patterns
from workbench.errors import ProbeOptionError
from workbench.headmap import Policy
from workbench.models import Model
from workbench.probe import Measurement, ScanContext
from workbench.scores import ScoreTable
from workbench.tasks.domains import domain_inputs

STREAMING = "streaming"
THRESHOLD = 0.1


def outside_window_mass(
    model: Model, token_ids: torch.Tensor, *, sink_size: int, recent_size: int, path: str = "auto"
) -> np.ndarray:
    """``[n_layers, n_heads]`` mean outside mass over the queries at positions >= S + W."""
    n = int(token_ids.numel())
    first = sink_size + recent_size
    if n <= first:
        raise ProbeOptionError(
            f"a prompt of {n} tokens has no query beyond sink_size + recent_size = {first}; "
            "use longer prompts (streaming_tokens) or a smaller window (streaming_recent)"
        )
    kept = dict(sink_size=sink_size, recent_window=recent_size)
    if resolve_path(path, n) == "pattern":
        per_layer = [torch.empty(0)] * model.info.n_layers

        def on_pattern(layer: int, pattern: torch.Tensor) -> None:  # [head, q_pos, k_pos]
            stats = stats_from_pattern(
                pattern[None, :, first:],
                **kept,
                q_positions=torch.arange(first, n, device=pattern.device),
                causal=model.info.causal,
            )
            per_layer[layer] = stats.outside_mass[0].mean(-1)  # [head]

        run_with_patterns(model, token_ids, on_pattern)
        return as_numpy(torch.stack(per_layer))
    rec = run_streamed(model, token_ids, **kept, q_positions=torch.arange(first, n), reduce="mean")
    return as_numpy(torch.stack([s.outside_mass[0] for s in rec.stats]))


@dataclass(frozen=True)
class StreamingProbe:
    name: str = "streaming"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        policy = Policy()
        sink_size = ctx.option("streaming_sink", policy.sink_size)
        recent_size = ctx.option("streaming_recent", policy.recent_size)
        if sink_size < 0 or recent_size < 1:
            raise ProbeOptionError("streaming_sink must be >= 0 and streaming_recent >= 1")
        domain, token_ids = domain_inputs(
            ctx.model.tokenizer,
            ctx.option("streaming_domain", "prose"),
            n_prompts=ctx.option("streaming_prompts", 2),
            n_tokens=ctx.option("streaming_tokens", 1024),
        )
        window = np.array([sink_size, recent_size], dtype=np.float32)
        return [
            Measurement(
                key=STREAMING,
                texts=[decode(ctx.model.tokenizer, ids) for ids in token_ids],
                token_ids=token_ids,
                definitions={
                    "outside_mass": f"mean over queries i at positions >= S + W of the mass on "
                    f"keys S <= j <= p_i - W ({domain} text; S, W in 'window')",
                    "window": "[sink_size S, recent_size W]",
                },
                measure=lambda i: {
                    "outside_mass": outside_window_mass(
                        ctx.model,
                        torch.as_tensor(token_ids[i]),
                        sink_size=sink_size,
                        recent_size=recent_size,
                        path=ctx.path,
                    ),
                    "window": window,
                },
            )
        ]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        s = stats[STREAMING]
        sink_size, recent_size = (int(v) for v in s["window"][0])
        return [
            ScoreTable.from_items(
                name="outside_window",
                per_item=s["outside_mass"],
                definition="streaming-head proxy (cf. DuoAttention): mean attention mass outside "
                f"the first {sink_size} tokens and the {recent_size} most recent ones, over "
                "queries that have such keys; high = the head needs the full KV cache",
                threshold=THRESHOLD,
                label="long_range",
                parameters={
                    "sink_size": sink_size,
                    "recent_size": recent_size,
                    "per_item": f"{STREAMING}/outside_mass",
                },
            )
        ]
