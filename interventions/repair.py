"""Self-repair: how much of a head's direct effect the rest of the network restores.

For each head, two numbers under the same intervention (zero ablation by default):

* **direct**: the metric when only the head's *direct* path to the logits changes. The change
  the intervention makes to the head's output, ``Δz W_O``, is added to the clean final residual
  and read through the final norm *with the clean run's scale frozen* (direct logit attribution,
  as in the TransformerLens IOI demo), so no later layer sees it.
* **total**: the metric observed when the head is intervened on and every later layer re-runs.

``direct_effect = clean − direct``, ``total_effect = clean − total``, and
``restored_share = 1 − total_effect / direct_effect``: the share of the direct effect that
downstream components give back (McGrath et al. 2023, "The Hydra Effect"; Rushing & Nanda 2024).
Reference figure: ablating GPT-2 small's L9H9 on the demo's 8 IOI prompts predicts a logit
difference of 0.57 from the direct effect but observes 2.99 (clean 3.55), a share of ~81%.

This runs on the streamed path (the Hugging Face modules give ``W_O``, the final norm and the
unembedding); models with an RMSNorm or LayerNorm final norm and a linear output projection per
attention block (Llama, Mistral, Qwen, SmolLM, ...) are supported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from interventions.engine import Intervener
from interventions.evaluation import _as_task
from interventions.specs import MeanAblation, parse_head, spec_from_dict
from workbench.errors import InterventionError
from workbench.models import Model
from workbench.tasks import Task

__all__ = ["direct_effects", "self_repair"]


def _final_norm(hf: torch.nn.Module) -> torch.nn.Module:
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.base_model
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise InterventionError(f"self-repair: no final norm found in {type(hf).__name__}")


def _output_projection(hf: torch.nn.Module, layer: int) -> Tensor:
    """``W_O [d_model, n_heads * d_head]`` of attention layer ``layer``."""
    for module in hf.modules():
        if getattr(module, "layer_idx", None) == layer:
            for name in ("o_proj", "out_proj", "dense"):
                proj = getattr(module, name, None)
                if isinstance(proj, torch.nn.Linear):
                    return proj.weight
    raise InterventionError(f"self-repair: no output projection found for layer {layer}")


def _direct_logits(
    hf: torch.nn.Module, clean_logits: Tensor, resid: Tensor, change: Tensor
) -> Tensor:
    """Clean logits plus the change read through the final norm at the clean scale.

    ``resid, change [batch, keep, d_model]``; returns ``[batch, keep, vocab]``.
    """
    norm = _final_norm(hf)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    weight = norm.weight
    if "rms" in type(norm).__name__.lower():
        scale = resid.pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
        normed = change * scale
    elif isinstance(norm, torch.nn.LayerNorm):
        scale = resid.var(-1, keepdim=True, unbiased=False).add(eps).rsqrt()
        normed = (change - change.mean(-1, keepdim=True)) * scale
    else:
        raise InterventionError(f"self-repair: unsupported final norm {type(norm).__name__}")
    unembed = hf.get_output_embeddings().weight  # [vocab, d_model]
    return clean_logits + (normed * weight) @ unembed.T


@torch.no_grad()
def self_repair(
    model: Model,
    task: Task | str,
    heads: list[Any],
    *,
    kind: str = "zero",
    options: dict[str, Any] | None = None,
    batch_size: int = 8,
    max_rows: int = 64,
) -> pd.DataFrame:
    """Direct vs total effect of intervening on each head alone (see the module docstring).

    Returns one row per head: ``layer, head, clean, direct, total, direct_effect,
    total_effect, restored_share`` for the task's headline metric.
    """
    task = _as_task(task)
    metric = task.metrics[0]
    specs = [spec_from_dict({"kind": kind, "heads": [parse_head(h)], **(options or {})})
             for h in heads]  # fmt: skip
    if not specs:
        raise InterventionError("self-repair needs at least one head")
    intervener = Intervener(model, max_rows=10**9)  # chunks are made here, with a clean group
    intervener.validate(specs)
    hf = model.hf
    batches = task.batches(model, batch_size)
    means = {}
    if any(isinstance(s, MeanAblation) for s in specs):
        layers = {lay for s in specs for lay in s.layers}
        means = intervener.mean_outputs([b.tokens for b in batches], layers, path="streamed")
    w_o = {lay: _output_projection(hf, lay) for s in specs for lay in s.layers}
    clean_values: list[np.ndarray] = []
    totals: list[list[np.ndarray]] = [[] for _ in specs]
    directs: list[list[np.ndarray]] = [[] for _ in specs]
    for batch in batches:
        b = batch.tokens.shape[0]
        per_pass = max(1, max_rows // b - 1)
        for start in range(0, len(specs), per_pass):
            chunk = specs[start : start + per_pass]
            captured: list[Tensor] = []
            hook = _final_norm(hf).register_forward_pre_hook(
                lambda _m, args, captured=captured: captured.append(args[0].detach())
            )
            try:
                out = intervener.run(batch.tokens, [[], *[[s] for s in chunk]],
                                     sources=batch.variants, means=means, keep=batch.keep,
                                     path="streamed", delta=True)  # fmt: skip
            finally:
                hook.remove()
            keep = out.logits.shape[2]
            resid = captured[0][:b, -keep:].float()  # clean final residual [b, keep, d_model]
            clean_logits = out.logits[0].float()
            if start == 0:
                clean_values.append(task.score(clean_logits, batch)[metric].cpu().numpy())
            for j, spec in enumerate(chunk):
                i = start + j
                logits = out.logits[j + 1]
                totals[i].append(task.score(logits, batch)[metric].float().cpu().numpy())
                ((layer, _),) = spec.heads
                delta = out.deltas[layer][j + 1]  # [b, keep, head, d_head]
                change = delta.flatten(-2) @ w_o[layer].float().T  # [b, keep, d_model]
                direct_logits = _direct_logits(hf, clean_logits, resid, change)
                directs[i].append(task.score(direct_logits, batch)[metric].float().cpu().numpy())
    clean = np.concatenate(clean_values).mean()
    rows = []
    for i, spec in enumerate(specs):
        total = np.concatenate(totals[i]).mean()
        direct = np.concatenate(directs[i]).mean()
        direct_effect, total_effect = clean - direct, clean - total
        share = 1 - total_effect / direct_effect if abs(direct_effect) > 1e-12 else np.nan
        layer, head = spec.heads[0]
        rows.append({"layer": layer, "head": head, "clean": clean, "direct": direct,
                     "total": total, "direct_effect": direct_effect,
                     "total_effect": total_effect, "restored_share": share})  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.attrs |= {"metric": metric, "kind": kind, "task": task.name}
    return frame


@torch.no_grad()
def direct_effects(model: Model, task: Task | str, *, batch_size: int = 8) -> pd.DataFrame:
    """Every head's direct effect on the task's headline metric, from one clean pass per batch.

    A head's direct effect is ``clean − metric(logits without the head's direct path)``: its
    output ``z_h W_O^h`` is removed from the final residual at the clean norm scale (direct
    logit attribution, the ``direct_effect`` of :func:`self_repair` under zero ablation). Returns
    one row per head, ``layer, head, direct_effect``, largest first.
    """
    task = _as_task(task)
    metric = task.metrics[0]
    info = model.info
    hf = model.hf
    intervener = Intervener(model)
    norm = _final_norm(hf)
    layers = range(info.n_layers)
    w_o = {lay: _output_projection(hf, lay).float() for lay in layers}
    totals = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)
    count = 0
    for batch in task.batches(model, batch_size):
        captured: list[Tensor] = []
        hook = norm.register_forward_pre_hook(lambda _m, args, c=captured: c.append(args[0]))
        try:  # one clean pass records every layer's z and the final residual
            recorded = intervener.record(batch.tokens, layers, path="streamed")
        finally:
            hook.remove()
        keep = batch.keep or batch.tokens.shape[1]
        resid = captured[0][:, -keep:].float()  # [b, keep, d_model]
        clean_logits = hf.get_output_embeddings()(norm(captured[0][:, -keep:])).float()
        clean = task.score(clean_logits, batch)[metric].double().cpu()
        d = info.d_head
        for layer in layers:
            z = recorded[layer]["z"][:, -keep:].float()  # [b, keep, head, d_head]
            for head in range(info.n_heads):
                out = z[:, :, head] @ w_o[layer][:, head * d : (head + 1) * d].T
                logits = _direct_logits(hf, clean_logits, resid, -out)
                without = task.score(logits, batch)[metric].double().cpu()
                totals[layer, head] += (clean - without).sum()
        count += batch.tokens.shape[0]
    if count == 0:
        raise InterventionError(f"task {task.name!r} produced no prompts")
    effects = (totals / count).numpy()
    layer_index, head_index = np.indices(effects.shape)
    frame = pd.DataFrame({"layer": layer_index.ravel(), "head": head_index.ravel(),
                          "direct_effect": effects.ravel()})  # fmt: skip
    frame = frame.sort_values("direct_effect", ascending=False, kind="stable")
    frame = frame.reset_index(drop=True)
    frame.attrs |= {"metric": metric, "task": task.name}
    return frame
