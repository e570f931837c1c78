"""Attention sinks and the extreme-token phenomena that come with them.

``sink`` -- first-token sink rate (Gu et al., "When Attention Sink Emerges in Language Models",
repo sail-sg/Attention-Sink). For key k, α_k = mean over the queries i >= k that can see it of
A[i, k]. A head has a sink at k when α_k > ε with ε = 0.3. Gu et al. report k = first token, as
the share of (layer, head) pairs averaged over samples. Here the score of a head is α_first
averaged over prompts, and the head is labelled ``sink`` when that exceeds ε. (In a causal model
every query sees the first token, so α_first is the mean of A[i, 0] over all queries; in a
bidirectional model likewise.)

``hidden_sink`` -- sinks beyond the first token (Yu et al., "Unveiling and Harnessing Hidden
Attention Sinks", ICML 2024, repo GATECH-EIC/ACT). Their rule (``atten_process_*`` in
``models/llama_modelling_aug.py``): with column sums c_k = Σ_i A[i, k] and n_k the number of
queries that see key k (N − k causal, N bidirectional), key k is a sink of the head when
c_k / n_k > 0.1; the first sink found (the first token) is dropped. The score of a head is the
largest c_k / n_k over keys k >= 1, averaged over prompts; labelled ``hidden_sink`` above 0.1.
One deviation, because the rule is meant for the whole sequence: a key seen by few queries
(the last keys of a causal prompt; key N − 1 is seen only by itself) passes on a single
query's attention, so keys need n_k >= ``min_queries`` (option ``hidden_sink_min_queries``,
default 8; 1 reproduces ACT exactly). Per prompt the run file keeps the number of hidden sinks
and the position of the strongest (its token is in the measurement's ``token_ids``).

``value_drain`` -- value-state drain (Guo et al. 2024, "Active-Dormant Attention Heads", repo
GuoTianYu2000/Active-Dormant-Attention): the sink token's value, as written to the residual
stream by head h, is small. Per head and token j: ‖v_j W_O^h‖ (v from ``hook_v``, the KV head
the query head reads; W_O^h ``[d_head, d_model]`` from the bridge). Score: the first token's
norm divided by the mean over the other tokens, averaged over prompts (< 1 = drain).

``residual_peak`` -- residual-state peak (Guo et al. 2024): the residual stream at the sink token
has a much larger norm than elsewhere. Per layer l: ‖resid_pre_l[0]‖ / mean_{j>0} ‖resid_pre_l[j]‖
(``blocks.{l}.hook_resid_pre``, the stream every head of layer l reads). It is a per-layer
number; the run file keeps it as ``[n_items, n_layers]`` and the score table repeats it over the
heads of a layer (the per-layer values are also in its parameters).

Capture paths. ``sink`` reads the ``basic`` measurement (:mod:`workbench.capture`, both paths).
The other three share the measurement ``sinks``. Pattern path: one forward per prompt through
:meth:`workbench.models.Model.bridge` with TransformerLens hooks ``hook_pattern`` (column sums),
``hook_v`` and ``hook_resid_pre``. Streamed path (long prompts): the column sums are the kernels'
received attention (:func:`kernels.received_attention`, no L×L), the values come from forward
hooks on each attention module's ``v_proj`` with W_O^h the h-th column block of ``o_proj.weight``
(Llama-family modules; other architectures are refused with a pointer to the pattern path), and
the residual norms from the model's ``hidden_states`` (``hidden_states[l]`` is layer l's input).
A test holds the two paths together. Options: ``hidden_sink_min_queries`` (int, default 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from probes.basic import BASIC, as_numpy, basic_measurement
from workbench.capture import StreamedRecorder, layer_of, resolve_path, run_with_patterns
from workbench.errors import ShapeError
from workbench.models import Model
from workbench.probe import Measurement, ScanContext
from workbench.scores import ScoreTable

SINKS = "sinks"
HIDDEN_SINK_THRESHOLD = 0.1  # ACT's threshold on c_k / n_k
HIDDEN_SINK_MIN_QUERIES = 8

SINK_STATISTICS: dict[str, str] = {
    "hidden_sink_score": "max over keys k >= 1 seen by >= min_queries queries of "
    "sum_i A[i, k] / (queries that see k) (ACT's hidden-sink statistic); 0 if no such key",
    "hidden_sink_count": "number of keys k >= 1 (seen by >= min_queries queries) with "
    f"sum_i A[i, k] / (queries that see k) > {HIDDEN_SINK_THRESHOLD}",
    "hidden_sink_position": "the key k of hidden_sink_score (-1 if no candidate key)",
    "hidden_sink_token": "the token id at hidden_sink_position (-1 if no candidate key)",
    "value_norm_first": "||v_0 W_O^h||, the first token's value as head h writes it",
    "value_norm_other": "mean over tokens j >= 1 of ||v_j W_O^h||",
    "residual_norm_first": "[n_layers] ||resid_pre_l[0]||, residual norm at the first token",
    "residual_norm_other": "[n_layers] mean over tokens j >= 1 of ||resid_pre_l[j]||",
}


def queries_seeing_keys(n: int, causal: bool) -> torch.Tensor:
    """``[k_pos]`` number of queries that can see each key (N − k causal, N bidirectional)."""
    if causal:
        return torch.arange(n, 0, -1, dtype=torch.float32)
    return torch.full((n,), float(n))


def sink_statistics(
    model: Model,
    token_ids: torch.Tensor,
    *,
    min_queries: int = HIDDEN_SINK_MIN_QUERIES,
    path: str = "auto",
) -> dict[str, np.ndarray]:
    """The ``sinks`` statistics of one prompt ``[seq]`` (see :data:`SINK_STATISTICS`) from the
    pattern path or the streamed path (``path`` as for :func:`workbench.capture.resolve_path`)."""
    info = model.info
    n = int(token_ids.numel())
    if n < 2:
        raise ShapeError(f"the sinks statistics need prompts of >= 2 tokens, got {n}")
    out: dict[str, np.ndarray] = {}
    seen_by = queries_seeing_keys(n, info.causal)  # [k_pos]
    candidate = (torch.arange(n) >= 1) & (seen_by >= min_queries)  # [k_pos]
    hidden: list[dict[str, np.ndarray]] = [{}] * info.n_layers
    values: list[torch.Tensor] = [torch.empty(0)] * info.n_layers  # [pos, head] per layer
    residual: list[torch.Tensor] = [torch.empty(0)] * info.n_layers  # [pos] per layer

    def on_received(layer: int, received: torch.Tensor) -> None:  # [head, k_pos] column sums
        hidden[layer] = _hidden_sinks(received.float().cpu() / seen_by, candidate, token_ids)

    if resolve_path(path, n) == "pattern":
        w_o = model.bridge().W_O.detach().float()  # [layer, head, d_head, d_model]

        def on_v(v: torch.Tensor, hook) -> None:  # [batch, pos, kv_head, d_head]
            values[layer_of(hook)] = _written_norms(v[0], w_o[layer_of(hook)])

        def on_resid(resid: torch.Tensor, hook) -> None:  # [batch, pos, d_model]
            residual[layer_of(hook)] = resid[0].float().norm(dim=-1).cpu()

        extra = [(f"blocks.{layer}.attn.hook_v", on_v) for layer in range(info.n_layers)]
        extra += [(f"blocks.{layer}.hook_resid_pre", on_resid) for layer in range(info.n_layers)]
        run_with_patterns(
            model, token_ids, lambda layer, pattern: on_received(layer, pattern.sum(1)), extra
        )
    else:
        values, residual = _streamed_sinks(model, token_ids, on_received)

    for name in (
        "hidden_sink_score",
        "hidden_sink_count",
        "hidden_sink_position",
        "hidden_sink_token",
    ):
        out[name] = np.stack([h[name] for h in hidden])
    norms = torch.stack(values)  # [layer, pos, head]
    out["value_norm_first"] = as_numpy(norms[:, 0])
    out["value_norm_other"] = as_numpy(norms[:, 1:].mean(1))
    resid = torch.stack(residual)  # [layer, pos]
    out["residual_norm_first"] = as_numpy(resid[:, 0])
    out["residual_norm_other"] = as_numpy(resid[:, 1:].mean(1))
    return out


def _hidden_sinks(
    alpha: torch.Tensor, candidate: torch.Tensor, token_ids: torch.Tensor
) -> dict[str, np.ndarray]:
    """ACT's statistic per head from ``alpha [head, k_pos]`` = column sum / queries seeing k."""
    n_heads = alpha.shape[0]
    if not candidate.any():
        empty = np.full(n_heads, -1.0, dtype=np.float32)
        return {
            "hidden_sink_score": np.zeros(n_heads, dtype=np.float32),
            "hidden_sink_count": np.zeros(n_heads, dtype=np.float32),
            "hidden_sink_position": empty,
            "hidden_sink_token": empty,
        }
    best, position = alpha.masked_fill(~candidate, -1.0).max(-1)  # [head]
    count = ((alpha > HIDDEN_SINK_THRESHOLD) & candidate).sum(-1)  # [head]
    return {
        "hidden_sink_score": as_numpy(best),
        "hidden_sink_count": as_numpy(count),
        "hidden_sink_position": as_numpy(position),
        "hidden_sink_token": as_numpy(token_ids.cpu()[position]),
    }


def _written_norms(v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """``||v_j W_O^h||`` as ``[pos, head]`` from ``v [pos, kv_head, d_head]`` and ``w_o [head,
    d_head, d_model]``; query head h reads KV head h // group (HF ``repeat_kv``)."""
    n_heads = w_o.shape[0]
    v = v.float().repeat_interleave(n_heads // v.shape[1], dim=1)  # [pos, head, d_head]
    written = torch.einsum("phd,hdm->phm", v, w_o.to(v.device))  # [pos, head, d_model]
    return written.norm(dim=-1).cpu()


def attention_modules(model: Model) -> list[torch.nn.Module]:
    """The HF attention modules with separate ``v_proj`` and ``o_proj`` (Llama family), by
    layer; the streamed path reads values and W_O there instead of from the bridge."""
    found = {
        int(module.layer_idx): module
        for module in model.hf.modules()
        if hasattr(module, "v_proj") and hasattr(module, "o_proj") and hasattr(module, "layer_idx")
    }
    if sorted(found) != list(range(model.info.n_layers)):
        raise NotImplementedError(
            f"the streamed sinks statistics read v_proj/o_proj of each attention module; "
            f"{model.info.architecture} has none (use path='pattern')"
        )
    return [found[layer] for layer in range(model.info.n_layers)]


def _streamed_sinks(
    model: Model, token_ids: torch.Tensor, on_received: Callable[[int, torch.Tensor], None]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Streamed path: received attention from the kernels, value norms from forward hooks on
    ``v_proj`` (W_O^h is the h-th column block of ``o_proj.weight``), residual norms from the
    model's hidden states (``hidden_states[l]`` is the input of layer l, ``hook_resid_pre``)."""
    info = model.info
    modules = attention_modules(model)
    values: list[torch.Tensor] = [torch.empty(0)] * info.n_layers

    def hook_for(layer: int, module: torch.nn.Module) -> Callable:
        w_o = module.o_proj.weight.detach().float()  # [d_model, head * d_head]
        w_o = w_o.T.reshape(info.n_heads, info.d_head, -1)  # [head, d_head, d_model]

        def on_v(_: torch.nn.Module, __: object, v: torch.Tensor) -> None:  # [1, pos, kv * d]
            values[layer] = _written_norms(v[0].view(v.shape[1], -1, info.d_head), w_o)

        return on_v

    handles = [m.v_proj.register_forward_hook(hook_for(i, m)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad(), StreamedRecorder(model.hf, received=True, reduce="mean") as rec:
            hidden_states = model.hf(
                token_ids[None].to(model.device), output_hidden_states=True
            ).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    for layer, received in enumerate(rec.received):  # [1, head, k_pos]
        on_received(layer, received[0])
    residual = [h[0].float().norm(dim=-1).cpu() for h in hidden_states[: info.n_layers]]
    return values, residual


def sinks_measurement(ctx: ScanContext) -> Measurement:
    """The ``sinks`` measurement over the scan's prompts (shared by three probes)."""
    token_ids = ctx.token_ids()
    min_queries = int(ctx.options.get("hidden_sink_min_queries", HIDDEN_SINK_MIN_QUERIES))
    return Measurement(
        key=SINKS,
        texts=list(ctx.prompts.texts),
        token_ids=token_ids,
        definitions=dict(SINK_STATISTICS),
        measure=lambda i: sink_statistics(
            ctx.model, torch.as_tensor(token_ids[i]), min_queries=min_queries, path=ctx.path
        ),
    )


@dataclass(frozen=True)
class FirstTokenSinkProbe:
    epsilon: float = 0.3
    name: str = "sink"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        return [basic_measurement(ctx)]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        alpha = stats[BASIC]["first_token_mass"]  # [n_prompts, n_layers, n_heads]
        table = ScoreTable(
            name=self.name,
            values=alpha.mean(axis=0),
            definition="first-token sink: alpha_1 = mean over queries of the attention on the "
            "first token, averaged over prompts; sink when alpha_1 > epsilon (Gu et al. 2024)",
            threshold=self.epsilon,
            label="sink",
            parameters={
                "epsilon": self.epsilon,
                "sink_token": 0,
                "sink_rate_per_prompt": float((alpha > self.epsilon).mean()),
            },
        )
        return [table]


@dataclass(frozen=True)
class HiddenSinkProbe:
    name: str = "hidden_sink"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        return [sinks_measurement(ctx)]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        s = stats[SINKS]
        score = s["hidden_sink_score"]  # [n_prompts, n_layers, n_heads]
        parameters = {
            "threshold": HIDDEN_SINK_THRESHOLD,
            "first_token_excluded": True,
            "hidden_sink_rate_per_prompt": float((score > HIDDEN_SINK_THRESHOLD).mean()),
        }
        return [
            ScoreTable(
                name=self.name,
                values=score.mean(axis=0),
                definition="hidden sink (ACT, Yu et al. 2024): max over keys k >= 1 of "
                "sum_i A[i, k] / (queries that see k), averaged over prompts; a key is a "
                "hidden sink when this exceeds 0.1",
                threshold=HIDDEN_SINK_THRESHOLD,
                label="hidden_sink",
                parameters=parameters,
            ),
            ScoreTable(
                name="hidden_sink_count",
                values=s["hidden_sink_count"].mean(axis=0),
                definition="mean number of hidden-sink keys (k >= 1, ACT's rule > 0.1) per prompt",
                parameters={"threshold": HIDDEN_SINK_THRESHOLD},
            ),
        ]


@dataclass(frozen=True)
class ValueDrainProbe:
    name: str = "value_drain"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        return [sinks_measurement(ctx)]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        s = stats[SINKS]
        ratio = s["value_norm_first"] / s["value_norm_other"]  # [n_prompts, n_layers, n_heads]
        return [
            ScoreTable(
                name=self.name,
                values=np.nanmean(ratio, axis=0),
                definition="value-state drain (Guo et al. 2024): ||v_0 W_O^h|| / mean_{j>0} "
                "||v_j W_O^h||, averaged over prompts; < 1 means the first token's value is "
                "drained",
            )
        ]


@dataclass(frozen=True)
class ResidualPeakProbe:
    name: str = "residual_peak"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        return [sinks_measurement(ctx)]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        s = stats[SINKS]
        per_layer = np.nanmean(s["residual_norm_first"] / s["residual_norm_other"], axis=0)
        n_heads = s["value_norm_first"].shape[-1]
        return [
            ScoreTable(
                name=self.name,
                values=np.repeat(per_layer[:, None], n_heads, axis=1),
                definition="residual-state peak (Guo et al. 2024): ||resid_pre_l[0]|| / "
                "mean_{j>0} ||resid_pre_l[j]||, averaged over prompts; a per-layer number "
                "repeated over the heads that read that residual stream",
                parameters={"per_layer": [round(float(v), 4) for v in per_layer]},
            )
        ]
