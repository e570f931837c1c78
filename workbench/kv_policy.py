"""Simulate a head-level KV-cache policy and measure what it costs: needle accuracy vs KV kept.

A serving stack that reads a head map (DuoAttention's ``full_attention_heads.tsv`` and the like;
see :mod:`workbench.export`) keeps the full KV cache for *full* KV heads and, for every other KV
head, only the first ``sink_size`` tokens plus the ``recent_size`` most recent ones (StreamingLLM's
sinks + window; DuoAttention's *streaming heads*, decided per KV head). This module runs a model
as if it were served that way and reports how often it still finds the needle.

The policy runs inside the model: :class:`CachePolicy` registers an attention function in
transformers' ``AttentionInterface`` (through :mod:`workbench.capture.attention`, as the
streamed capture path does) that gives each KV head's
query heads either ordinary causal attention or attention restricted to

    key j visible to the query at position p  ⇔  j ≤ p and (j < S or j > p − W)

(S = sink_size, W = recent_size; the complement of the ``outside`` set of
:mod:`kernels.reference`). Prefill and decoding both apply it, as DuoAttention does. Streaming
heads are computed in query blocks of :data:`BLOCK` rows against just the sink keys and the keys
of the block's window (SDPA with a ``[block, S + W + block]`` mask), so no L×L tensor exists.

:func:`evaluate_map` answers needle trials by greedy decoding under several policies: the map's
own selection (threshold), its top fractions of KV heads, a seeded random map of the same size for
each, all-full (the unmodified model) and all-streaming. A trial is answered when the ROUGE-1
recall of the answer in the response exceeds 0.5 (the retrieval probe's filter). The KV share is
the share of (layer, KV head, position) cache entries a policy keeps at the prompt's length.
"""

from __future__ import annotations

import platform
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.capture.attention import AttentionCall, attend, register, use_attention
from workbench.errors import CaptureError, ShapeError
from workbench.models import Model
from workbench.tasks.needle import NeedleTrial, rouge1_recall

__all__ = [
    "SERVING_NAME",
    "CachePolicy",
    "evaluate_map",
    "greedy_answer",
    "policy_attention",
    "random_map",
]

SERVING_NAME = "workbench_serving"
BLOCK = 256  # query rows per block of streaming-head attention
MIN_RECALL = 0.5

_ACTIVE: ContextVar[CachePolicy | None] = ContextVar("workbench_serving", default=None)


@dataclass
class CachePolicy:
    """Which KV heads keep the full cache; the others keep sinks + a recent window.

    Use as a context manager around forward passes of ``model`` (a transformers model)::

        with CachePolicy(kv_full, sink_size=4, recent_size=256).applied(model.hf):
            model.hf(input_ids)
    """

    kv_full: np.ndarray  # [n_layers, n_kv_heads] bool
    sink_size: int = 4
    recent_size: int = 256

    def __post_init__(self) -> None:
        self.kv_full = np.asarray(self.kv_full, dtype=bool)
        if self.kv_full.ndim != 2:
            raise ShapeError(f"kv_full must be [n_layers, n_kv_heads], got {self.kv_full.shape}")
        if self.sink_size < 0 or self.recent_size < 1:
            raise ValueError("sink_size must be >= 0 and recent_size >= 1")

    @property
    def full_fraction(self) -> float:
        return float(self.kv_full.mean())

    def kv_kept(self, length: int) -> float:
        """Share of the full cache's (layer, KV head, position) entries kept at ``length``."""
        streaming = min(length, self.sink_size + self.recent_size) / length
        return float(self.kv_full.mean() + (1 - self.kv_full.mean()) * streaming)

    def applied(self, model: torch.nn.Module) -> _Applied:
        return _Applied(self, model)


class _Applied:
    """Context: ``model`` runs its attention through :func:`serving_attention_forward`."""

    def __init__(self, policy: CachePolicy, model: torch.nn.Module) -> None:
        self.policy, self.model = policy, model
        n_layers = model.config.get_text_config().num_hidden_layers
        if policy.kv_full.shape[0] != n_layers:
            raise ShapeError(
                f"policy has {policy.kv_full.shape[0]} layers, the model {n_layers}; "
                "was the map made for another model?"
            )

    def __enter__(self) -> CachePolicy:
        self._swap = use_attention(self.model, SERVING_NAME)
        self._swap.__enter__()
        self._token = _ACTIVE.set(self.policy)
        return self.policy

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)
        self._swap.__exit__(*exc)


def policy_attention(call: AttentionCall) -> Tensor:
    """Attention function of the active :class:`CachePolicy`: the layer's output ``[batch,
    n_heads, q_len, d_v]`` with each KV head's query heads seeing the keys the policy keeps (the
    query rows are the last ``q_len`` key positions)."""
    policy = _ACTIVE.get()
    if policy is None:
        raise RuntimeError("serving attention called outside CachePolicy.applied(model)")
    if call.padding is not None:
        raise CaptureError("the KV-policy simulation takes unpadded single sequences")
    if not call.causal:
        raise CaptureError("the KV-policy simulation is for causal decoders")
    query, key, value = call.query, call.key, call.value
    batch, n_heads, q_len, _ = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    full = torch.as_tensor(policy.kv_full[call.layer])  # [n_kv_heads] bool
    if full.numel() != n_kv:
        raise ShapeError(f"policy has {full.numel()} KV heads per layer, the model {n_kv}")
    out = query.new_empty(batch, n_kv, group, q_len, value.shape[-1])  # [b, kv, group, q, d_v]
    q5 = query.view(batch, n_kv, group, q_len, -1)  # [batch, kv_head, group, q_pos, d]
    if not bool(full.all()) and not call.plain:
        raise CaptureError(
            f"the KV-policy simulation keeps sinks + a recent window on streaming heads of plain "
            f"causal layers; layer {call.layer} ({type(call.module).__name__}) has its own local "
            "window, chunks, softcap or learned sinks"
        )
    for heads, window in ((full, None), (~full, policy.recent_size)):
        index = torch.nonzero(heads).flatten()  # [n_sel] KV heads
        if not len(index):
            continue
        q = q5[:, index].flatten(1, 2)  # [batch, n_sel * group, q_pos, d]
        k, v = key[:, index], value[:, index]  # [batch, n_sel, k_len, d]
        if window is None:  # full heads attend as the model does, variants included
            rows = (index[:, None] * group + torch.arange(group)).flatten()  # query heads
            sinks = None if call.sinks is None else call.sinks[rows.to(call.sinks.device)]
            selected = attend(call.with_tensors(query=q, key=k, value=v, sinks=sinks))
        else:
            selected = _attend(q, k, v, call.scale, policy.sink_size, window)
        out[:, index] = selected.unflatten(1, (len(index), group))
    return out.flatten(1, 2)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, sink: int, window: int | None
) -> Tensor:
    """Causal attention of the last ``q_len`` positions; with ``window``, each query sees only keys
    ``j < sink`` or ``j > p - window``. ``q [b, h, q, d]``, ``k/v [b, kv, k, d]`` (GQA)."""
    q_len, k_len = q.shape[2], k.shape[2]
    offset = k_len - q_len
    gqa = q.shape[1] != k.shape[1]
    if window is None or k_len <= sink + window:  # every visible key is kept
        if q_len == 1 or q_len == k_len:
            return F.scaled_dot_product_attention(
                q, k, v, scale=scale, is_causal=q_len > 1, enable_gqa=gqa
            )
        window = k_len  # a partial prefill: the block path below with a window that keeps all
    sink = min(sink, k_len)
    blocks = []
    for a in range(0, q_len, BLOCK):
        b = min(a + BLOCK, q_len)
        pos = torch.arange(offset + a, offset + b, device=q.device)  # [rows] absolute
        lo = max(sink, offset + a - window + 1)  # first window key any row of the block sees
        hi = offset + b  # one past the last key the block sees
        keys = torch.cat(
            [torch.arange(sink, device=q.device), torch.arange(lo, hi, device=q.device)]
        )
        mask = (keys[None] <= pos[:, None]) & (
            (keys[None] < sink) | (keys[None] > pos[:, None] - window)
        )  # [rows, sink + hi - lo] bool, True = attend
        blocks.append(
            F.scaled_dot_product_attention(
                q[:, :, a:b],
                k[:, :, keys],
                v[:, :, keys],
                attn_mask=mask,
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(blocks, dim=2)


register(SERVING_NAME, policy_attention)


# ---------------------------------------------------------------------------------------------
# Needle accuracy under a policy


@torch.no_grad()
def greedy_answer(
    model: Model, trial: NeedleTrial, max_new_tokens: int = 40, stop_when_found: bool = True
) -> tuple[list[int], float]:
    """Greedy response to a needle trial and the ROUGE-1 recall of its answer in it.

    Decoding stops at EOS, at a newline after some non-blank text, after ``max_new_tokens``, or
    (with ``stop_when_found``) as soon as the response holds every answer word.
    """
    hf, tokenizer = model.hf, model.tokenizer
    prompt = torch.as_tensor(trial.token_ids)[None].to(model.device)
    steps = max(1, min(max_new_tokens, model.info.max_context - prompt.shape[1] + 1))
    generated: list[int] = []
    recall = 0.0
    out = hf(prompt, use_cache=True, logits_to_keep=1)
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        recall = rouge1_recall(trial.answer, text)
        done = token == tokenizer.eos_token_id or "\n" in text.lstrip()
        if done or (stop_when_found and recall == 1.0) or len(generated) == steps:
            break
        out = hf(
            torch.tensor([[token]], device=model.device),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return generated, recall


def random_map(shape: tuple[int, int], n_full: int, seed: int) -> np.ndarray:
    """``[n_layers, n_kv_heads]`` bool with ``n_full`` KV heads chosen uniformly (seeded)."""
    chosen = np.random.default_rng(seed).choice(shape[0] * shape[1], size=n_full, replace=False)
    full = np.zeros(shape[0] * shape[1], dtype=bool)
    full[chosen] = True
    return full.reshape(shape)


def evaluate_map(
    model: Model,
    maps: dict[str, np.ndarray],
    trials: list[NeedleTrial],
    *,
    sink_size: int = 4,
    recent_size: int = 256,
    random_seed: int = 0,
    max_new_tokens: int = 40,
    progress: Any = None,
) -> pd.DataFrame:
    """Needle accuracy and KV share per (length, policy).

    Args:
        maps: ``{name: [n_layers, n_kv_heads] bool}`` head maps to test (e.g. ``"retrieval
            top 0.25"``); each also gets a random map with as many full KV heads (seeded with
            ``random_seed``), and ``"full"`` / ``"streaming only"`` are added.
        trials: needle trials (:mod:`workbench.tasks.needle`), any mix of lengths.
        progress: a callable ``progress(done, total)`` or None.

    Returns:
        One row per (length, policy): ``length, policy, kind`` (map / random / baseline),
        ``full_kv_heads``, ``full_fraction``, ``kv_kept``, ``accuracy``, ``mean_recall``,
        ``trials``.
    """
    shape = (model.info.n_layers, model.info.n_kv_heads)
    policies: list[tuple[str, str, np.ndarray]] = [("full", "baseline", np.ones(shape, bool))]
    for name, kv_full in maps.items():
        kv_full = np.asarray(kv_full, dtype=bool)
        if kv_full.shape != shape:
            raise ShapeError(f"map {name!r} is {kv_full.shape}, the model's KV heads {shape}")
        policies.append((name, "map", kv_full))
        policies.append(
            (f"random ({int(kv_full.sum())} KV heads, seed {random_seed})", "random",
             random_map(shape, int(kv_full.sum()), random_seed))
        )  # fmt: skip
    policies.append(("streaming only", "baseline", np.zeros(shape, bool)))

    rows, done, total = [], 0, len(policies) * len(trials)
    for name, kind, kv_full in policies:
        policy = CachePolicy(kv_full, sink_size, recent_size)
        recalls: dict[int, list[float]] = {}
        with policy.applied(model.hf):
            for trial in trials:
                _, recall = greedy_answer(model, trial, max_new_tokens)
                recalls.setdefault(len(trial.token_ids), []).append(recall)
                done += 1
                if progress is not None:
                    progress(done, total)
        for length, values in sorted(recalls.items()):
            rows.append(
                {
                    "length": length,
                    "policy": name,
                    "kind": kind,
                    "full_kv_heads": int(kv_full.sum()),
                    "full_fraction": round(policy.full_fraction, 4),
                    "kv_kept": round(policy.kv_kept(length), 4),
                    "accuracy": float(np.mean([r > MIN_RECALL for r in values])),
                    "mean_recall": round(float(np.mean(values)), 4),
                    "trials": len(values),
                }
            )
    return pd.DataFrame(rows).sort_values(["length", "kind", "full_fraction"], kind="stable")


def machine() -> str:
    """One line naming where a measurement ran."""
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu})"
    return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
