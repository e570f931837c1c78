"""Attention and causal evidence for the toy models' ground-truth heads.

Two kinds of evidence, both measured on fresh task samples (seeds from `EVAL_SEED`):

- *Attention behaviour*: where a head looks from the positions the task scores. Each task marks,
  per scored position, the source position the mechanism must read (`ToyBatch.source`), so "mean
  attention from the scored position to its source" is defined the same way for every task.
- *Causal effect*: the task metric with a head's output zeroed (`zero_heads`), against the metric
  with matched random non-ground-truth heads zeroed. A head is ground truth only when both agree.

Bigram-Backcopy adds the extreme-token numbers of Guo et al.: attention received by <bos>
(attention sink), ‖v·W_O‖ at <bos> vs other tokens (value-state drain), and residual norm at <bos>
vs other tokens (residual-state peak).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from workbench.tasks.toy import N_SPECIAL, BigramBackcopy, ToyBatch

Head = tuple[int, int]  # (layer, head)


@contextmanager
def zero_heads(hf_model: PreTrainedModel, heads: list[Head]) -> Iterator[None]:
    """Zero the outputs of `heads` ((layer, head) pairs) inside the context.

    A forward pre-hook on each layer's `self_attn.o_proj` zeroes the head's slice of its input,
    which is the concatenation of per-head outputs, [batch, seq, n_heads * head_dim]; head h owns
    features [h * head_dim, (h + 1) * head_dim). Zeroing there removes exactly that head's
    contribution to the residual stream and leaves every other head untouched.
    """
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make_hook(layer_heads: list[int]):
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
            x = args[0].clone()  # [batch, seq, n_heads * head_dim]
            for h in layer_heads:
                x[..., h * head_dim : (h + 1) * head_dim] = 0
            return (x, *args[1:])

        return hook

    layers = hf_model.model.layers
    handles = [
        layers[layer].self_attn.o_proj.register_forward_pre_hook(make_hook(hs))
        for layer, hs in by_layer.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def all_heads(hf_model: PreTrainedModel) -> list[Head]:
    c = hf_model.config
    return list(itertools.product(range(c.num_hidden_layers), range(c.num_attention_heads)))


@torch.no_grad()
def task_metrics(
    hf_model: PreTrainedModel, batch: ToyBatch, ablate: list[Head] | None = None
) -> dict[str, float]:
    """Accuracy (argmax == answer) and mean loss at the scored positions, plus the mean logit
    difference answer − competitor where the task defines a competitor (IOI: IO − S)."""
    with zero_heads(hf_model, ablate or []):
        logits = hf_model(input_ids=batch.input_ids).logits  # [batch, seq, vocab]
    answer = batch.input_ids[:, 1:]  # [batch, seq-1]
    mask = batch.eval_mask[:, :-1]
    scored = logits[:, :-1][mask]  # [n_scored, vocab]
    target = answer[mask]
    out = {
        "accuracy": (scored.argmax(-1) == target).float().mean().item(),
        "loss": torch.nn.functional.cross_entropy(scored, target).item(),
        "n_scored": int(mask.sum()),
    }
    wrong = batch.wrong[:, :-1][mask]
    if (wrong >= 0).all():
        rows = torch.arange(len(target))
        out["logit_diff"] = (scored[rows, target] - scored[rows, wrong]).mean().item()
    return out


@torch.no_grad()
def attention_patterns(hf_model: PreTrainedModel, batch: ToyBatch) -> torch.Tensor:
    """All attention patterns, [layer, batch, head, q_pos, k_pos], via the eager implementation."""
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation("eager")
    try:
        out = hf_model(input_ids=batch.input_ids, output_attentions=True)
    finally:
        hf_model.set_attn_implementation(previous)
    return torch.stack(out.attentions)


def attention_to(patterns: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean attention from query positions to key positions, per head: [layer, head].

    `patterns` is [layer, batch, head, q_pos, k_pos]; `queries` and `keys` are [n, 2] (batch, pos)
    index pairs of equal length, or `keys` is a single key position for all queries."""
    b, q = queries[:, 0], queries[:, 1]
    k = keys[:, 1] if keys.dim() == 2 else keys.expand_as(q)
    picked = patterns.permute(1, 3, 4, 0, 2)[b, q, k]  # [n, layer, head]
    return picked.mean(dim=0)


def source_attention(patterns: torch.Tensor, batch: ToyBatch) -> torch.Tensor:
    """Mean attention from each scored position to its source position: [layer, head]."""
    queries = batch.eval_mask.nonzero()  # [n, 2]
    keys = torch.stack([queries[:, 0], batch.source[batch.eval_mask]], dim=1)
    return attention_to(patterns, queries, keys)


def bb_dormant_attention(patterns: torch.Tensor, batch: ToyBatch, task: BigramBackcopy) -> dict:
    """Bigram-Backcopy split of each head's behaviour, all [layer, head]: attention to the previous
    token and to <bos> from triggers (active) and from non-trigger tokens (dormant), and to the
    query token itself from non-triggers (the other place a head can park its attention)."""
    ids = batch.input_ids
    trigger_ids = torch.tensor([i + N_SPECIAL for i in task.triggers])
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    non_trigger = ~torch.isin(ids, trigger_ids) & (pos >= 2)
    trig = batch.eval_mask.nonzero()
    non = non_trigger.nonzero()

    def prev(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([idx[:, 0], idx[:, 1] - 1], dim=1)

    bos = torch.tensor(0)
    return {
        "trigger_to_prev": attention_to(patterns, trig, prev(trig)),
        "trigger_to_bos": attention_to(patterns, trig, bos),
        "non_trigger_to_bos": attention_to(patterns, non, bos),
        "non_trigger_to_prev": attention_to(patterns, non, prev(non)),
        "non_trigger_to_self": attention_to(patterns, non, non),
    }


def recall_previous_token(patterns: torch.Tensor, batch: ToyBatch) -> torch.Tensor:
    """Mean attention from each queried stored value to its key (the token before it):
    [layer, head]."""
    values = torch.stack([batch.eval_mask.nonzero()[:, 0], batch.source[batch.eval_mask]], dim=1)
    keys = torch.stack([values[:, 0], values[:, 1] - 1], dim=1)
    return attention_to(patterns, values, keys)


def recall_induction_attention(patterns: torch.Tensor, batch: ToyBatch) -> torch.Tensor:
    """Mean total attention from each query key to the earlier positions whose previous token is
    that key (the stored values of every occurrence): [layer, head]. This is the induction target
    of TransformerLens' head detector (the duplicate-token pattern shifted one key right)."""
    total = torch.zeros(patterns.shape[0], patterns.shape[2])
    queries = batch.eval_mask.nonzero()  # [n, 2] (batch, pos)
    for b, q in queries.tolist():
        follows_key = batch.input_ids[b, : q - 1] == batch.input_ids[b, q]  # [q - 1]
        keys = follows_key.nonzero().flatten() + 1
        total += patterns[:, b, :, q, keys].sum(-1)
    return total / len(queries)


def ioi_subject_attention(patterns: torch.Tensor, batch: ToyBatch) -> torch.Tensor:
    """Mean total attention from the final token to the subject's two mentions: [layer, head]."""
    total = torch.zeros(patterns.shape[0], patterns.shape[2])
    queries = batch.eval_mask.nonzero()
    for b, q in queries.tolist():
        start = int(batch.source[b, q]) - 2  # the sentence's first clause starts at most here
        window = batch.input_ids[b, start:q] == batch.wrong[b, q]
        keys = start + window.nonzero().flatten()
        total += patterns[:, b, :, q, keys].sum(-1)
    return total / len(queries)


@torch.no_grad()
def bb_extreme_tokens(hf_model: PreTrainedModel, batch: ToyBatch) -> dict[str, list[float]]:
    """Guo et al.'s extreme-token numbers, per layer (lists over layers, heads averaged):
    attention received by <bos> (mean over queries), ‖v·W_O‖ at <bos> vs the mean over other
    tokens, and the residual-stream norm at <bos> vs other tokens (input to each layer)."""
    config = hf_model.config
    n_heads = config.num_attention_heads
    head_dim = config.hidden_size // n_heads
    values: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(lambda _m, _a, out: values.append(out))
        for layer in hf_model.model.layers
    ]
    try:
        patterns = attention_patterns(hf_model, batch)  # [layer, batch, head, q, k]
        hidden = hf_model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    n_layers = config.num_hidden_layers
    values = values[:n_layers]  # the first (eager) pass; the second pass repeats them
    sink, v_bos, v_rest, r_bos, r_rest = [], [], [], [], []
    for layer in range(n_layers):
        sink.append(patterns[layer, :, :, :, 0].mean().item())
        w_o = hf_model.model.layers[layer].self_attn.o_proj.weight  # [d_model, n_heads*head_dim]
        v = values[layer].unflatten(-1, (n_heads, head_dim))  # [batch, seq, head, head_dim]
        w = w_o.T.unflatten(0, (n_heads, head_dim))  # [head, head_dim, d_model]
        vo = torch.einsum("bshd,hde->bshe", v, w).norm(dim=-1)  # [batch, seq, head]
        v_bos.append(vo[:, 0].mean().item())
        v_rest.append(vo[:, 1:].mean().item())
        res = hidden[layer].norm(dim=-1)  # [batch, seq]
        r_bos.append(res[:, 0].mean().item())
        r_rest.append(res[:, 1:].mean().item())
    return {
        "bos_attention_received": sink,
        "value_norm_bos": v_bos,
        "value_norm_other": v_rest,
        "residual_norm_bos": r_bos,
        "residual_norm_other": r_rest,
    }


def random_head_control(
    hf_model: PreTrainedModel,
    batch: ToyBatch,
    heads: list[Head],
    *,
    pool: list[Head] | None = None,
    draws: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics with random head sets of the size of `heads` zeroed, averaged over the draws.

    Sets are drawn from `pool` (default: every head not in `heads`); when the pool offers no more
    distinct sets than `draws`, every set is used once."""
    pool = pool if pool is not None else [h for h in all_heads(hf_model) if h not in heads]
    combos = list(itertools.combinations(pool, len(heads)))
    if len(combos) > draws:
        combos = random.Random(seed).sample(combos, draws)
    results = [task_metrics(hf_model, batch, list(c)) for c in combos]
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]} | {
        "n_draws": len(combos)
    }


def per_head_ablation(hf_model: PreTrainedModel, batch: ToyBatch) -> dict[Head, dict[str, float]]:
    """Task metrics with each single head zeroed."""
    return {h: task_metrics(hf_model, batch, [h]) for h in all_heads(hf_model)}


__all__ = [
    "all_heads",
    "attention_patterns",
    "bb_dormant_attention",
    "bb_extreme_tokens",
    "ioi_subject_attention",
    "per_head_ablation",
    "random_head_control",
    "recall_induction_attention",
    "recall_previous_token",
    "source_attention",
    "task_metrics",
    "zero_heads",
]
