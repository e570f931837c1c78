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
stream by head h, is small. Per head and token j: ‖v_j W_O^h‖ (v the value of the KV head the
query head reads, W_O^h ``[d_v, d_model]`` head h's rows of the output projection; its bias is
added once per layer, not per head, and is left out). Score: the first token's norm divided by
the mean over the other tokens, averaged over prompts (< 1 = drain).

``residual_peak`` -- residual-state peak (Guo et al. 2024): the residual stream at the sink token
has a much larger norm than elsewhere. Per layer l: ‖resid_pre_l[0]‖ / mean_{j>0} ‖resid_pre_l[j]‖
(``blocks.{l}.hook_resid_pre``, the stream every head of layer l reads). It is a per-layer
number; the run file keeps it as ``[n_items, n_layers]`` and the score table repeats it over the
heads of a layer (the per-layer values are also in its parameters).

Capture paths. ``sink`` reads the ``basic`` measurement (:mod:`workbench.capture`, both paths).
The other three share the measurement ``sinks``.

* Pattern path: one forward per prompt through :meth:`workbench.models.Model.bridge` with
  TransformerLens hooks ``hook_pattern`` (column sums), ``hook_v`` (``[batch, pos, kv_head,
  d_head]``, or ``[batch, head, pos, d_v]`` where TransformerLens marks the hook's ``pos_dim`` as
  2, as its MLA bridge does) and ``hook_resid_pre``; W_O^h is the bridge's ``W_O`` (read after
  the forward: TransformerLens learns MLA's value width on the first one).
* Streamed path (long prompts), on every family whose attention goes through the workbench's
  attention swap (:mod:`workbench.capture.attention`): the column sums are the kernels' received
  attention (:func:`kernels.received_attention`, no L×L); the values are exactly what the
  attention function receives (``AttentionCall.value [batch, n_kv_heads, k_len, d_v]``, handed
  over by the recorder's ``on_attention``), so fused QKV projections (Phi-3, GPT-2's ``c_attn``,
  GPT-NeoX's ``query_key_value``, ModernBERT's ``Wqkv``) and MLA's decompressed values need no
  per-family code. W_O is found by what it does, not by its name: the first ``nn.Linear`` or
  transformers ``Conv1D`` whose input equals the layer's attention output with the heads
  concatenated (a forward pre-hook compares them exactly) is the layer's output projection
  (``o_proj``, ``c_proj``, ``dense``, ``out_proj``, ``Wo``, ...); its weight, split per head, is
  W_O^h (:func:`head_blocks`: ``nn.Linear`` stores ``[d_model, head·d_v]``, ``Conv1D``
  ``[head·d_v, d_model]``). (The bridge's ``W_O`` is not used here: the streamed path must not
  need TransformerLens, which has no adapter for some families, e.g. ModernBERT.) The residual
  norms come from the model's ``hidden_states``
  (``hidden_states[l]`` is layer l's input). Where the attention does not go through the swap
  (Falcon), or no linear layer reads its output unchanged (an output gate, a quantised
  projection), a :class:`~workbench.errors.CaptureError` names the pattern path.

Both paths compute ‖v_j W_O^h‖ as ‖v_j R_hᵀ‖ with W_O^hᵀ = Q_h R_h (QR; Q_h has orthonormal
columns), so memory stays ``[pos, head, d_v]`` however large d_model is. Tests hold the two paths
together statistic by statistic on the tiny Llama and eight families of the architecture matrix
(``tests/probes/test_sinks.py``), and score table by score table on every family that has both
(``tests/architectures``). Options: ``hidden_sink_min_queries`` (int, default 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from probes.basic import BASIC, as_numpy, basic_measurement
from workbench.capture import (
    AttentionCall,
    QueryLayout,
    StreamedRecorder,
    layer_of,
    resolve_path,
    run_with_patterns,
)
from workbench.errors import CaptureError, ShapeError
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
    hidden: list[dict[str, np.ndarray]] = [{}] * info.n_layers
    values: list[torch.Tensor] = [torch.empty(0)] * info.n_layers  # [pos, head] per layer
    residual: list[torch.Tensor] = [torch.empty(0)] * info.n_layers  # [pos] per layer

    def on_received(layer: int, received: torch.Tensor, layout: QueryLayout) -> None:
        # received: [head, k_pos] column sums; layout.seen_by: [k_pos] queries that see key k
        # (N - k for a global causal layer; fewer behind a local window or in a chunk)
        seen_by = layout.seen_by.clamp(min=1)
        candidate = (torch.arange(n) >= 1) & (layout.seen_by >= min_queries)  # [k_pos]
        hidden[layer] = _hidden_sinks(received.float().cpu() / seen_by, candidate, token_ids)

    if resolve_path(path, n) == "pattern":
        raw_values: list[torch.Tensor] = [torch.empty(0)] * info.n_layers  # [pos, kv_head, d_v]

        def on_v(v: torch.Tensor, hook) -> None:  # [batch, pos, kv_head, d_head]
            if getattr(hook, "pos_dim", None) == 2:  # [batch, kv_head, pos, d_v] (TL's MLA)
                v = v.transpose(1, 2)
            raw_values[layer_of(hook)] = v[0].detach()

        def on_resid(resid: torch.Tensor, hook) -> None:  # [batch, pos, d_model]
            residual[layer_of(hook)] = resid[0].float().norm(dim=-1).cpu()

        extra = [(f"blocks.{layer}.attn.hook_v", on_v) for layer in range(info.n_layers)]
        extra += [(f"blocks.{layer}.hook_resid_pre", on_resid) for layer in range(info.n_layers)]
        run_with_patterns(
            model,
            token_ids,
            lambda layer, pattern: on_received(
                layer, pattern.sum(1), QueryLayout.from_pattern(pattern)
            ),
            extra,
        )
        w_o = model.bridge().W_O.detach()  # [layer, head, d_v, d_model], after the forward
        values = [_written_norms(v, w_o[layer]) for layer, v in enumerate(raw_values)]
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


def head_blocks(projection: torch.nn.Module, n_heads: int) -> torch.Tensor:
    """W_O^h of every head, ``[head, d_v, d_model]``, from a layer's output projection: an
    ``nn.Linear`` (weight ``[d_model, head·d_v]``) or transformers' ``Conv1D`` (GPT-2; weight
    ``[head·d_v, d_model]``). Input features are the heads' outputs concatenated, head-major."""
    weight = projection.weight.detach()
    if not isinstance(projection, Conv1D):
        weight = weight.T  # [head * d_v, d_model]
    return weight.reshape(n_heads, -1, weight.shape[-1])


def _in_features(projection: torch.nn.Module) -> int | None:
    """Input width of a plain float ``nn.Linear`` / ``Conv1D`` weight; None for anything else."""
    weight = projection.weight
    if weight.ndim != 2 or not weight.is_floating_point():
        return None
    return int(weight.shape[0 if isinstance(projection, Conv1D) else 1])


def _written_norms(v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """``||v_j W_O^h||`` as ``[pos, head]`` (CPU) from ``v [pos, kv_head, d_v]`` and ``w_o [head,
    d_v, d_model]``; query head h reads KV head h // group (HF ``repeat_kv``).

    With W_O^hᵀ = Q_h R_h (QR, Q_h ``[d_model, d_v]`` with orthonormal columns, R_h ``[d_v,
    d_v]``), v W_O^h = (v R_hᵀ) Q_hᵀ has the norm of v R_hᵀ: no ``[pos, head, d_model]`` tensor,
    and no squared norms to lose precision in."""
    n_heads = w_o.shape[0]
    r = torch.linalg.qr(w_o.float().transpose(1, 2).to(v.device), mode="r").R  # [head, k, d_v]
    v = v.float().repeat_interleave(n_heads // v.shape[1], dim=1)  # [pos, head, d_v]
    return torch.einsum("phd,hkd->phk", v, r).norm(dim=-1).cpu()


class _OutputProjections:
    """Streamed path: value norms ``||v_j W_O^h||`` per layer, W_O found by what it does.

    ``on_attention`` (a :class:`StreamedRecorder` callback) keeps a layer's values and attention
    output until a forward pre-hook on the model's ``nn.Linear`` and ``Conv1D`` modules sees a
    module whose input equals that output with the heads concatenated: the layer's output
    projection. Its weight gives W_O^h (:func:`head_blocks`), the norms are computed and both
    tensors dropped, so at most one layer's values (O(L·d)) wait at a time.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.norms: dict[int, torch.Tensor] = {}  # layer -> [pos, head]
        self._waiting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        linear = (torch.nn.Linear, Conv1D)
        self._handles = [
            module.register_forward_pre_hook(self._on_linear)
            for module in model.modules()
            if isinstance(module, linear)
        ]

    def on_attention(self, layer: int, call: AttentionCall, output: torch.Tensor) -> None:
        """Wait for the layer's output projection: ``output [batch, head, q_pos, d_v]`` as the
        model receives it (``[batch, q_pos, head, d_v]``) and ``call.value [batch, kv_head,
        k_pos, d_v]``."""
        self._waiting[layer] = (output.transpose(1, 2), call.value)

    def _on_linear(self, module: torch.nn.Module, args: tuple) -> None:
        if not self._waiting or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]  # [..., head * d_v] where this is an output projection
        for layer, (output, value) in self._waiting.items():  # output [batch, q_pos, head, d_v]
            if (
                x.numel() == output.numel()
                and x.shape[-1] == output.shape[-2] * output.shape[-1]
                and _in_features(module) == x.shape[-1]  # a packed (quantised) weight is not
                and torch.equal(x.reshape(output.shape), output)
            ):
                w_o = head_blocks(module, output.shape[-2])  # [head, d_v, d_model]
                self.norms[layer] = _written_norms(value[0].transpose(0, 1), w_o)
                del self._waiting[layer]
                return

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def _streamed_sinks(
    model: Model,
    token_ids: torch.Tensor,
    on_received: Callable[[int, torch.Tensor, QueryLayout], None],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Streamed path: received attention from the kernels, value norms from the values the
    attention function receives and the linear layer that reads its output
    (:class:`_OutputProjections`), residual norms from the model's hidden states
    (``hidden_states[l]`` is the input of layer l, ``hook_resid_pre``)."""
    info = model.info
    projections = _OutputProjections(model.hf)
    try:
        with StreamedRecorder(
            model.hf, received=True, reduce="mean", on_attention=projections.on_attention
        ) as rec:
            hidden_states = model.hf(
                token_ids[None].to(model.device), output_hidden_states=True
            ).hidden_states
    finally:
        projections.remove()
    layers = list(range(info.n_layers))
    missing = [layer for layer in layers if layer not in rec.masks]  # masks: layers that ran
    if missing:
        raise CaptureError(
            f"{info.architecture}'s attention did not run through the workbench's attention "
            f"function for layers {missing} (it does not dispatch through transformers' "
            "AttentionInterface); use path='pattern'"
        )
    missing = [layer for layer in layers if layer not in projections.norms]
    if missing:
        raise CaptureError(
            f"the sinks statistics found no nn.Linear/Conv1D reading the attention output of "
            f"layers {missing} of {info.architecture} unchanged (an output gate or a quantised "
            "projection), so they have no W_O for its value norms; use path='pattern'"
        )
    n = int(token_ids.numel())
    for layer, received in enumerate(rec.received):  # [1, head, k_pos]
        mask = rec.masks[layer]
        layout = QueryLayout.from_mask(n, causal=info.causal, window=mask.window, chunk=mask.chunk)
        on_received(layer, received[0], layout)
    values = [projections.norms[layer] for layer in layers]
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
        table = ScoreTable.from_items(
            name=self.name,
            per_item=alpha,
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
        learned = stats[BASIC].get("learned_sink_mass")  # [n_prompts, n_layers, n_heads]
        if learned is None or not np.nanmax(learned) > 0:
            return [table]  # no learned sink logits (every model but gpt-oss-like ones)
        learned_table = ScoreTable.from_items(
            name="learned_sink",
            per_item=learned,
            definition="learned sink: mean over queries of the probability on the head's learned "
            "sink logit (gpt-oss s_aux, a softmax slot without a value), averaged over prompts; "
            "a sink when it exceeds epsilon, as for the first-token sink",
            threshold=self.epsilon,
            label="learned_sink",
            parameters={"epsilon": self.epsilon},
        )
        return [table, learned_table]


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
            ScoreTable.from_items(
                name=self.name,
                per_item=score,
                definition="hidden sink (ACT, Yu et al. 2024): max over keys k >= 1 of "
                "sum_i A[i, k] / (queries that see k), averaged over prompts; a key is a "
                "hidden sink when this exceeds 0.1",
                threshold=HIDDEN_SINK_THRESHOLD,
                label="hidden_sink",
                parameters=parameters,
            ),
            ScoreTable.from_items(
                name="hidden_sink_count",
                per_item=s["hidden_sink_count"],
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
            ScoreTable.from_items(
                name=self.name,
                per_item=ratio,
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
        ratio = s["residual_norm_first"] / s["residual_norm_other"]  # [n_prompts, n_layers]
        per_layer = np.nanmean(ratio, axis=0)
        n_heads = s["value_norm_first"].shape[-1]
        return [
            ScoreTable.from_items(
                name=self.name,
                per_item=np.repeat(ratio[:, :, None], n_heads, axis=2),
                definition="residual-state peak (Guo et al. 2024): ||resid_pre_l[0]|| / "
                "mean_{j>0} ||resid_pre_l[j]||, averaged over prompts; a per-layer number "
                "repeated over the heads that read that residual stream",
                parameters={"per_layer": [round(float(v), 4) for v in per_layer]},
            )
        ]
