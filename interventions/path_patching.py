"""Per-head causal evidence for circuit discovery: direct logit attribution, attribution
patching, position-wise mean ablation and path patching, on TransformerLens hooks of the model's
bridge (``blocks.{l}.attn.hook_z [batch, pos, head, d_head]``, ``hook_q [batch, pos, head,
d_head]``, ``hook_k``/``hook_v [batch, pos, kv_head, d_head]``).

Definitions (all measured on a :class:`~workbench.tasks.templated.TaskDataset` whose metric is the
logit difference at END):

* **Head output** ``out_h = z_h @ W_O[l, h]`` ``[batch, pos, d_model]``: the head's write into the
  residual stream (the bridge's ``W_O [layer, head, d_head, d_model]``).
* **Direct logit attribution** (TransformerLens ``cache.stack_head_results`` +
  ``logit_attrs``): ``out_h`` at END through the final norm with its scale frozen at the clean run's
  value (linear), dotted with ``W_U[:, answer] - W_U[:, wrong]``. The direct effects of all
  components add up to the logit difference.
* **Direct effect of corrupting a head** (path patching sender -> logits, Wang et al. 2022
  §3.1, restricted to the direct path): the DLA of ``out_h(ABC) - out_h(clean)``. It freezes the
  MLPs as well as the other heads, which is what makes it free to compute from two caches.
* **Attribution patching** (Nanda 2023, "Attribution patching"; Syed et al. 2023): the first-order
  estimate ``Σ_pos (z_h^ABC - z_h^clean) · ∂metric/∂z_h`` of each head's activation-patching
  effect, all heads from one forward and one backward pass. Used to pick which heads get the exact
  (one forward pass each) activation patching on large models.
* **Path patching** (Wang et al. 2022 §3.1, algorithm of their appendix B): to measure how much
  sender ``s`` matters *through* a set of receivers' queries, keys or values,

  1. record every head's output on the clean and the corrupted (ABC) prompts;
  2. run the clean prompts with every head frozen to its clean output except ``s``, which gets
     its corrupted output (MLPs are recomputed), and record the receivers' q/k/v at the receiving
     position;
  3. run the clean prompts with only the receivers' q/k/v at that position replaced by step 2's,
     and read the metric.

  Step 2 stops after the last receiver layer. Senders are batched: the prompts are tiled once per
  sender, each tile patching its own sender. On grouped-query models the keys and values of a
  query head belong to its KV head, so a k/v receiver patches the whole KV group (said in the
  result's notes); queries are per query head.
* **Mean ablation by position**: a head's output replaced by its mean over the reference (ABC)
  prompts *of the same template at the same position* (the paper's faithfulness ablation); the
  engine's :class:`~interventions.specs.MeanAblation` averages over every token instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.errors import InterventionError
from workbench.models import Model
from workbench.tasks.templated import TaskDataset

Head = tuple[int, int]  # (layer, query head)
VIA = ("q", "k", "v")


class _StopForward(Exception):
    """Raised by a hook once everything a partial forward pass needs is recorded."""


def z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


@dataclass
class Recording:
    """Clean-run activations every piece of evidence reads.

    ``z [layer, batch, pos, head, d_head]``, ``pattern [layer, batch, head, q_pos, k_pos]``
    (optional), ``final_scale [batch]`` (the final norm's scale at END) and ``logits`` at END
    ``[batch, vocab]``.
    """

    z: Tensor  # [layer, batch, pos, head, d_head]
    pattern: Tensor | None  # [layer, batch, head, q_pos, k_pos]
    final_scale: Tensor  # [batch]
    end_logits: Tensor  # [batch, vocab]


@torch.no_grad()
def record(model: Model, data: TaskDataset, patterns: bool = True) -> Recording:
    """One forward pass over ``data`` keeping every head's ``z`` (and attention patterns)."""
    bridge = model.bridge()
    n_layers = model.info.n_layers
    keep = {z_name(layer) for layer in range(n_layers)} | {"ln_final.hook_scale"}
    if patterns:
        keep |= {f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)}
    tokens = data.tokens.to(model.device)
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in keep)
    rows = torch.arange(len(data))
    end = data.end
    z = torch.stack([cache[z_name(layer)].cpu().float() for layer in range(n_layers)])
    pattern = None
    if patterns:
        pattern = torch.stack(
            [cache[f"blocks.{layer}.attn.hook_pattern"].cpu().float() for layer in range(n_layers)]
        )
    scale = cache["ln_final.hook_scale"].cpu().float()[rows, end, 0]  # [batch]
    return Recording(z, pattern, scale, logits[rows, end.to(logits.device)].cpu().float())


def answer_direction(model: Model, data: TaskDataset) -> Tensor:
    """``[batch, d_model]``: the final norm's weight times ``W_U[:, answer] - W_U[:, wrong]``;
    a residual vector ``x`` at END adds ``(x / scale) · direction`` to the logit difference."""
    bridge = model.bridge()
    w_u = bridge.W_U.detach().cpu().float()  # [d_model, vocab]
    direction = (w_u[:, data.answer_ids] - w_u[:, data.wrong_ids]).T  # [batch, d_model]
    norm = getattr(bridge.ln_final, "_original_component", bridge.ln_final)
    weight = getattr(norm, "weight", None)
    if weight is not None:
        direction = direction * weight.detach().cpu().float()
    return direction


def head_outputs_at(model: Model, z: Tensor, positions: Tensor) -> Tensor:
    """Every head's output at one position per prompt: ``z [layer, batch, pos, head, d_head]``,
    ``positions [batch]`` -> ``[layer, head, batch, d_model]``."""
    w_o = model.bridge().W_O.detach().cpu().float()  # [layer, head, d_head, d_model]
    rows = torch.arange(z.shape[1])
    z_at = z[:, rows, positions]  # [layer, batch, head, d_head]
    return torch.einsum("lbhd,lhdm->lhbm", z_at, w_o)


def direct_logit_attribution(
    model: Model, data: TaskDataset, z: Tensor, final_scale: Tensor
) -> Tensor:
    """``[layer, head, batch]``: each head's direct contribution to logit(answer) - logit(wrong)
    at END (final norm scale frozen at ``final_scale [batch]``)."""
    out = head_outputs_at(model, z, data.end)  # [layer, head, batch, d_model]
    if model.bridge().cfg.normalization_type in ("LN", "LNPre"):
        out = out - out.mean(-1, keepdim=True)  # LayerNorm centres before it scales
    direction = answer_direction(model, data)  # [batch, d_model]
    return torch.einsum("lhbm,bm->lhb", out, direction) / final_scale


def attribution_patching(
    model: Model, clean: TaskDataset, corrupt_z: Tensor, clean_z: Tensor
) -> Tensor:
    """``[layer, head]``: first-order estimate of the change of the mean logit difference when a
    head's output (all positions) is patched from the corrupted run into the clean run."""
    bridge = model.bridge()
    n_layers = model.info.n_layers
    shifts = {}

    def add_shift(z: Tensor, hook) -> Tensor:  # [batch, pos, head, d_head]
        shift = torch.zeros_like(z, requires_grad=True)
        shifts[int(hook.name.split(".")[1])] = shift
        return z + shift

    params = [p for p in model.hf.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # gradients w.r.t. activations only
    try:
        with torch.enable_grad():
            hooks = [(z_name(layer), add_shift) for layer in range(n_layers)]
            logits = bridge.run_with_hooks(clean.tokens.to(model.device), fwd_hooks=hooks)
            clean.logit_diff(logits).mean().backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    grads = torch.stack([shifts[layer].grad.cpu().float() for layer in range(n_layers)])
    return ((corrupt_z - clean_z) * grads).sum(-1).sum(2).mean(1)  # [layer, head]


def _tile(x: Tensor, k: int) -> Tensor:
    """Repeat along the batch: copy ``i`` of prompt ``b`` at row ``i * batch + b``."""
    return x.repeat(k, *([1] * (x.ndim - 1)))


def position_means(z: Tensor, groups: Tensor) -> Tensor:
    """``z [layer, batch, pos, head, d_head]`` averaged over the prompts of each group, broadcast
    back to ``[layer, batch, pos, head, d_head]`` (the paper's template-wise mean)."""
    out = torch.empty_like(z)
    for g in groups.unique():
        rows = (groups == g).nonzero()[:, 0]
        out[:, rows] = z[:, rows].mean(1, keepdim=True)
    return out


@torch.no_grad()
def run_with_replaced_heads(
    model: Model, data: TaskDataset, replacement: Tensor, replaced: Tensor
) -> Tensor:
    """Logit difference ``[batch]`` of ``data`` with heads replaced at every position.

    ``replacement [layer, batch, pos, head, d_head]``: what the heads write instead (e.g.
    :func:`position_means` of the ABC run); ``replaced [layer, head]`` bool: which heads.
    """
    if replacement.shape[1:3] != data.tokens.shape:
        raise InterventionError("the replacement activations do not match the prompts")
    hooks = []
    for layer in range(model.info.n_layers):
        heads = replaced[layer].nonzero()[:, 0]
        if len(heads) == 0:
            continue

        def patch(z: Tensor, hook, layer: int = layer, heads: Tensor = heads) -> Tensor:
            z = z.clone()
            z[:, :, heads] = replacement[layer][:, :, heads].to(z.device, z.dtype)
            return z

        hooks.append((z_name(layer), patch))
    logits = model.bridge().run_with_hooks(data.tokens.to(model.device), fwd_hooks=hooks)
    return data.logit_diff(logits).cpu().float()


@dataclass
class PathPatchResult:
    """Metric after path patching each sender into the receivers: ``metric [sender]`` (mean
    logit difference over the prompts), with the clean value and what was patched."""

    senders: list[Head]
    receivers: list[Head]
    via: str
    metric: Tensor  # [sender]
    clean_metric: float
    notes: str

    @property
    def effect(self) -> Tensor:
        """``[sender]`` relative change of the metric, (patched - clean) / |clean|."""
        return (self.metric - self.clean_metric) / abs(self.clean_metric)


@torch.no_grad()
def path_patch(
    model: Model,
    clean: TaskDataset,
    clean_z: Tensor,
    corrupt_z: Tensor,
    senders: Sequence[Head],
    receivers: Sequence[Head],
    via: str,
    position: str,
    max_rows: int = 64,
    progress: Callable[[int, int], None] | None = None,
    clean_metric: float | None = None,
) -> PathPatchResult:
    """Path patching of each sender -> ``receivers``' ``via`` (q, k or v) at role ``position``.

    ``clean_z``, ``corrupt_z``: ``[layer, batch, pos, head, d_head]`` recorded on the clean and
    the corrupted prompts. Returns the mean logit difference of the clean prompts after patching,
    per sender (see the module docstring for the three steps).
    """
    if via not in VIA:
        raise InterventionError(f"path patching goes through q, k or v, not {via!r}")
    if not receivers:
        raise InterventionError("path patching needs at least one receiver head")
    info = model.info
    bridge = model.bridge()
    n = len(clean)
    pos = clean.positions[position]  # [batch]
    # Receivers by layer; k/v live on KV heads.
    by_layer: dict[int, list[int]] = {}
    for layer, head in receivers:
        index = head if via == "q" else info.kv_head(head)
        if index not in by_layer.setdefault(layer, []):
            by_layer[layer].append(index)
    if clean_metric is None:
        clean_metric = float(clean.logit_diff(bridge(clean.tokens.to(model.device))).mean())
    per_chunk = max(1, max_rows // n)
    metrics = []
    senders = list(senders)
    for start in range(0, len(senders), per_chunk):
        chunk = senders[start : start + per_chunk]
        metrics.append(
            _path_patch_chunk(model, clean, clean_z, corrupt_z, chunk, by_layer, via, pos)
        )
        if progress is not None:
            progress(min(start + per_chunk, len(senders)), len(senders))
    notes = ""
    if via in ("k", "v") and info.n_kv_heads != info.n_heads:
        notes = (
            f"grouped-query attention: the {via} of a receiver is its KV head's, shared by "
            f"{info.group_size} query heads; the patch acts on the whole group"
        )
    return PathPatchResult(
        senders=senders,
        receivers=list(receivers),
        via=via,
        metric=torch.cat(metrics) if metrics else torch.zeros(0),
        clean_metric=clean_metric,
        notes=notes,
    )


def _path_patch_chunk(
    model: Model,
    clean: TaskDataset,
    clean_z: Tensor,
    corrupt_z: Tensor,
    chunk: list[Head],
    by_layer: dict[int, list[int]],
    via: str,
    pos: Tensor,
) -> Tensor:
    """Steps 2 and 3 of path patching for a chunk of senders, one tile of prompts each;
    returns the mean logit difference per sender ``[len(chunk)]``."""
    bridge = model.bridge()
    n, k = len(clean), len(chunk)
    last = max(by_layer)
    tokens = _tile(clean.tokens, k).to(model.device)
    rows = torch.arange(k * n)
    tiled_pos = _tile(pos, k)
    # Step 2: every head frozen to clean, each tile's sender to its corrupted output.
    frozen = {}
    for layer in range(last + 1):
        z = _tile(clean_z[layer], k).clone()  # [k * batch, pos, head, d_head]
        for i, (s_layer, s_head) in enumerate(chunk):
            if s_layer == layer:
                z[i * n : (i + 1) * n, :, s_head] = corrupt_z[layer][:, :, s_head]
        frozen[layer] = z
    captured: dict[int, Tensor] = {}

    def freeze(z: Tensor, hook) -> Tensor:
        return frozen[int(hook.name.split(".")[1])].to(z.device, z.dtype)

    def capture(act: Tensor, hook) -> None:  # [rows, pos, head or kv_head, d_head]
        layer = int(hook.name.split(".")[1])
        captured[layer] = act[rows, tiled_pos.to(act.device)][:, by_layer[layer]].clone()
        if layer == last:
            raise _StopForward

    hooks = [(z_name(layer), freeze) for layer in range(last + 1)]
    hooks += [(f"blocks.{layer}.attn.hook_{via}", capture) for layer in by_layer]
    try:
        with bridge.hooks(fwd_hooks=hooks):
            bridge(tokens)
    except _StopForward:
        pass

    # Step 3: the clean run with only the receivers' q/k/v at the position replaced.
    def receive(act: Tensor, hook) -> Tensor:  # [rows, pos, head or kv_head, d_head]
        layer = int(hook.name.split(".")[1])
        act = act.clone()
        row_pos = tiled_pos.to(act.device)
        patched = act[rows, row_pos]  # [rows, head or kv_head, d_head]
        patched[:, by_layer[layer]] = captured[layer].to(act.device, act.dtype)
        act[rows, row_pos] = patched
        return act

    hooks = [(f"blocks.{layer}.attn.hook_{via}", receive) for layer in by_layer]
    logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
    at_end = logits[rows.to(logits.device), _tile(clean.end, k).to(logits.device)]
    right = at_end.gather(1, _tile(clean.answer_ids, k).to(at_end.device)[:, None])[:, 0]
    wrong = at_end.gather(1, _tile(clean.wrong_ids, k).to(at_end.device)[:, None])[:, 0]
    return (right - wrong).float().cpu().reshape(k, n).mean(1)
