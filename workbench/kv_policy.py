"""Simulate a head-level KV-cache policy and measure what it costs: needle accuracy vs KV kept.

A serving stack that reads a head map (DuoAttention's ``full_attention_heads.tsv`` and the like;
see :mod:`workbench.export`) keeps the full KV cache for *full* KV heads and, for every other KV
head, only the first ``sink_size`` tokens plus the ``recent_size`` most recent ones (StreamingLLM's
sinks + window; DuoAttention's *streaming heads*, decided per KV head). This module runs a model
as if it were served that way and reports how often it still finds the needle.

The policy runs inside the model: :class:`CachePolicy` registers an attention function in
transformers' ``AttentionInterface`` (through :mod:`workbench.capture.attention`, as the
streamed capture path does). Every layer, of every attention variant the swap takes (sliding
windows, chunks, logit softcapping, learned sink logits), splits its query heads by KV head.
Heads of a full KV head attend as the model does. A streaming head's query at position p sees
key j only when the layer's own mask shows it (causal, and inside the layer's window or chunk)
*and* the policy keeps it; with S = ``sink_size``, W = ``recent_size``, the policy keeps

    ``prefill="streamed"`` (DuoAttention's, the default): j < S or j > p − W, for every query:
        the prefill and each decoding step alike; a streaming head's cache always holds the S
        sinks and the W most recent keys (the query's own key included);
    ``prefill="exact"`` (NVIDIA kvpress's ``DuoAttentionPress``): the *prefill*, i.e. the
        forward that starts from an empty cache, of C tokens, runs every head as the model does;
        after it the streaming heads' cache is cut to its first S and last W keys, and every later
        query at p ≥ C (the question when it comes as a forward of its own, as kvpress's pipeline
        sends it, and each decoded token) sees j < S or j ≥ C − W. Keys written after the prefill
        (C ≤ j ≤ p) all stay: kvpress compresses once, after prefill, and not while decoding.

Scores get the layer's softcap before the softmax, and learned sink logits (gpt-oss) stay in every
head's softmax denominator, so a streaming head's weights are the model's own softmax over the
keys it keeps. Keys are the cache's positions 0..k_len − 1, so the simulation needs a cache that
keeps every key (:func:`greedy_answer` passes a ``DynamicCache()`` without a config; transformers'
sliding-window cache layers drop keys, and a call that shows a cache losing keys is refused).

Streaming heads are computed in query blocks of :data:`BLOCK` rows against just the sink keys and
the keys the block's rows keep (``[block, S + W + block]`` in prefill), so no L×L tensor exists:
SDPA with that boolean mask on plain, local and chunked layers, the same softmax in plain torch
(fp32) on softcapped or learned-sink layers, which SDPA cannot express.

:func:`evaluate_map` answers needle trials by greedy decoding under several policies: the map's
own selection (threshold), its top fractions of KV heads, a seeded random map of the same size for
each, all-full (the unmodified model) and all-streaming. With ``prefill="exact"`` the context (the
tokens before the trial's question) is one forward and the question another, as kvpress sends
them. A trial is answered when the ROUGE-1 recall of the answer in the response exceeds 0.5 (the
retrieval probe's filter). The KV share is the share of (layer, KV head, position) cache entries a
policy keeps once the prompt is read.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from kernels.reference import key_range
from workbench.capture.attention import AttentionCall, attend, register, use_attention
from workbench.errors import CaptureError, ShapeError
from workbench.models import Model
from workbench.tasks.needle import NeedleTrial, rouge1_recall

__all__ = [
    "PREFILL_POLICIES",
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
PREFILL_POLICIES = ("exact", "streamed")  # module docstring: what each query sees

_ACTIVE: ContextVar[_Applied | None] = ContextVar("workbench_serving", default=None)


def check_prefill(prefill: object) -> str:
    """``prefill`` if it names one of :data:`PREFILL_POLICIES`, else a `CaptureError`."""
    if not isinstance(prefill, str) or prefill not in PREFILL_POLICIES:
        raise CaptureError(f"prefill must be one of {', '.join(PREFILL_POLICIES)}, got {prefill!r}")
    return prefill


@dataclass
class CachePolicy:
    """Which KV heads keep the full cache; the others keep sinks + a recent window, from the
    prefill on (``prefill="streamed"``) or after an exact prefill (``"exact"``; module docstring).

    Use as a context manager around forward passes of ``model`` (a transformers model)::

        with CachePolicy(kv_full, sink_size=4, recent_size=256).applied(model.hf):
            model.hf(input_ids)
    """

    kv_full: np.ndarray  # [n_layers, n_kv_heads] bool
    sink_size: int = 4
    recent_size: int = 256
    prefill: str = "streamed"

    def __post_init__(self) -> None:
        self.kv_full = np.asarray(self.kv_full, dtype=bool)
        if self.kv_full.ndim != 2:
            raise ShapeError(f"kv_full must be [n_layers, n_kv_heads], got {self.kv_full.shape}")
        sizes = (self.sink_size, self.recent_size)
        if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in sizes):
            raise CaptureError(f"sink_size and recent_size must be integers, got {sizes}")
        if self.sink_size < 0 or self.recent_size < 1:
            raise CaptureError(
                f"sink_size must be >= 0 and recent_size >= 1, got {self.sink_size} and "
                f"{self.recent_size}"
            )
        check_prefill(self.prefill)

    @property
    def full_fraction(self) -> float:
        return float(self.kv_full.mean())

    def kv_kept(self, length: int, context: int | None = None) -> float:
        """Share of the full cache's (layer, KV head, position) entries kept once ``length``
        prompt tokens are read. ``context``: with an exact prefill, the tokens of the compressed
        prefill (the rest, the question, stays whole); None, and always with a streamed prefill,
        the whole prompt."""
        if context is None or self.prefill == "streamed":
            context = length
        streaming = (min(context, self.sink_size + self.recent_size) + length - context) / length
        return float(self.kv_full.mean() + (1 - self.kv_full.mean()) * streaming)

    def applied(self, model: torch.nn.Module) -> _Applied:
        return _Applied(self, model)


class _Applied:
    """Context: ``model`` runs its attention through :func:`policy_attention`.

    It also keeps, per layer, how many keys the cache holds after the last call (``cached``) and
    the length of the last prefill (``prefilled``, the compressed context of an exact prefill).
    """

    def __init__(self, policy: CachePolicy, model: torch.nn.Module) -> None:
        self.policy, self.model = policy, model
        n_layers = model.config.get_text_config().num_hidden_layers
        if policy.kv_full.shape[0] != n_layers:
            raise ShapeError(
                f"policy has {policy.kv_full.shape[0]} layers, the model {n_layers}; "
                "was the map made for another model?"
            )
        self.cached: dict[int, int] = {}
        self.prefilled: dict[int, int] = {}

    def __enter__(self) -> CachePolicy:
        self._swap = use_attention(self.model, SERVING_NAME)
        self._swap.__enter__()
        self._token = _ACTIVE.set(self)
        return self.policy

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)
        self._swap.__exit__(*exc)

    def kept_from(self, call: AttentionCall) -> Tensor | None:
        """``[q_len]`` int64: the first non-sink key each query row of a streaming head keeps
        (it keeps ``j < sink_size`` and ``j >= kept_from``), or None when this call evicts
        nothing (the exact prefill). Records the call in ``cached`` / ``prefilled``."""
        layer, q_len, k_len = call.layer, call.query.shape[2], call.key.shape[2]
        offset = k_len - q_len  # keys already in the cache
        if offset == 0:
            self.prefilled[layer] = k_len
        elif self.cached.get(layer) != offset:
            raise CaptureError(
                f"layer {layer} was handed a KV cache of {offset} keys that did not grow from this "
                f"policy's last call ({self.cached.get(layer)} keys): the simulation needs every "
                "key at its position, from a prefill under the policy (pass "
                "past_key_values=DynamicCache(), which keeps sliding-window layers whole)"
            )
        self.cached[layer] = k_len
        if self.policy.prefill == "streamed":
            return torch.arange(offset, k_len) - self.policy.recent_size + 1
        if offset == 0:
            return None
        return torch.full((q_len,), self.prefilled[layer] - self.policy.recent_size)


def policy_attention(call: AttentionCall) -> Tensor:
    """Attention function of the active :class:`CachePolicy`: the layer's output ``[batch,
    n_heads, q_len, d_v]`` with each KV head's query heads seeing the keys the model's mask shows
    and the policy keeps (the query rows are the last ``q_len`` key positions)."""
    applied = _ACTIVE.get()
    if applied is None:
        raise RuntimeError("serving attention called outside CachePolicy.applied(model)")
    policy = applied.policy
    if call.padding is not None:
        raise CaptureError("the KV-policy simulation takes unpadded single sequences")
    if not call.causal:
        raise CaptureError("the KV-policy simulation is for causal decoders")
    if call.layer is None:
        raise CaptureError(
            f"{type(call.module).__name__} carries no layer_idx: the KV-policy simulation cannot "
            "tell which layer of the map it is"
        )
    query, key, value = call.query, call.key, call.value
    batch, n_heads, q_len, _ = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    full = torch.as_tensor(policy.kv_full[call.layer])  # [n_kv_heads] bool
    if full.numel() != n_kv:
        raise ShapeError(f"policy has {full.numel()} KV heads per layer, the model {n_kv}")
    kept_from = applied.kept_from(call)  # [q_len] or None
    sink = min(policy.sink_size, key.shape[2])
    if bool(full.all()) or kept_from is None or not _evicts(call, sink, kept_from):
        return attend(call)  # every head sees what the model's mask shows
    out = query.new_empty(batch, n_kv, group, q_len, value.shape[-1])  # [b, kv, group, q, d_v]
    q5 = query.view(batch, n_kv, group, q_len, -1)  # [batch, kv_head, group, q_pos, d]
    for heads, streaming in ((full, False), (~full, True)):
        index = torch.nonzero(heads).flatten()  # [n_sel] KV heads
        if not len(index):
            continue
        rows = (index[:, None] * group + torch.arange(group)).flatten()  # [n_sel * group] heads
        # indices go to the GPU without a blocking copy: a CPU index, or a blocking copy, makes
        # the host wait for the GPU at every layer (and, while decoding, at every token)
        kv = index.to(query.device, non_blocking=True)
        selected = call.with_tensors(
            query=q5[:, kv].flatten(1, 2),  # [batch, n_sel * group, q_pos, d]
            key=key[:, kv],  # [batch, n_sel, k_len, d]
            value=value[:, kv],
            sinks=None
            if call.sinks is None
            else call.sinks[rows.to(call.sinks.device, non_blocking=True)],
        )
        result = _streaming(selected, sink, kept_from) if streaming else attend(selected)
        out[:, kv] = result.unflatten(1, (len(index), group))
    return out.flatten(1, 2)


def _mask_range(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """``(first, end)``, ``[q_len]`` int64 each: the layer's own mask shows key j to query row
    i when ``first[i] <= j < end[i]`` (causal, local window, chunks; `kernels.reference`)."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    positions = torch.arange(k_len - q_len, k_len)  # [q_len] absolute query positions
    first, end = key_range(positions, k_len, causal=True, window=call.window, chunk=call.chunk)
    return first[0], end[0]


def _evicts(call: AttentionCall, sink: int, kept_from: Tensor) -> bool:
    """Whether the policy hides from some query row a key that the layer's mask shows: a key
    ``sink <= j < kept_from`` at or after the row's first visible key."""
    first, end = _mask_range(call)
    return bool((torch.minimum(kept_from, end) > torch.maximum(first, torch.tensor(sink))).any())


def _streaming(call: AttentionCall, sink: int, kept_from: Tensor) -> Tensor:
    """Streaming heads' output ``[batch, n_heads, q_len, d_v]``: query row i (at position p)
    sees key j when the layer's mask shows it and ``j < sink or j >= kept_from[i]``.

    Query blocks of :data:`BLOCK` rows attend to the sink keys and keys ``lo <= j < hi``, the
    span the block's rows keep (``kept_from`` and the mask's range never decrease with p)."""
    query, key, value = call.query, call.key, call.value
    q_len = query.shape[2]
    first, end = _mask_range(call)  # [q_len] each
    device = query.device
    blocks = []
    for a in range(0, q_len, BLOCK):
        b = min(a + BLOCK, q_len)
        lo = max(sink, int(kept_from[a]), int(first[a]))
        hi = int(end[b - 1])
        keys = torch.cat([torch.arange(sink), torch.arange(lo, max(lo, hi))])  # [n_keys]
        visible = (
            (keys[None] >= first[a:b, None])
            & (keys[None] < end[a:b, None])
            & ((keys[None] < sink) | (keys[None] >= kept_from[a:b, None]))
        )  # [rows, n_keys] bool, True = attend
        keys, visible = keys.to(device, non_blocking=True), visible.to(device, non_blocking=True)
        blocks.append(
            _softmax_attention(call, query[:, :, a:b], key[:, :, keys], value[:, :, keys], visible)
        )
    return torch.cat(blocks, dim=2)


def _softmax_attention(
    call: AttentionCall, q: Tensor, k: Tensor, v: Tensor, visible: Tensor
) -> Tensor:
    """Attention of ``q [b, h, rows, d]`` over ``k/v [b, kv, keys, d]`` (GQA) where ``visible
    [rows, keys]`` shows, with the layer's scale, softcap and learned sinks: ``[b, h, rows, d_v]``.
    SDPA when neither softcap nor sinks is set; else the softmax in fp32 torch, the sink logit as
    one more column with no value."""
    gqa = q.shape[1] != k.shape[1]
    if call.softcap is None and call.sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, scale=call.scale, enable_gqa=gqa
        )
    n_heads, n_kv = q.shape[1], k.shape[1]
    q5 = q.float().unflatten(1, (n_kv, n_heads // n_kv))  # [b, kv, group, rows, d]
    scores = q5 @ k.float()[:, :, None].transpose(-1, -2) * call.scale  # [b, kv, g, rows, keys]
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    scores = scores.masked_fill(~visible, -math.inf)
    if call.sinks is not None:
        sink_logit = call.sinks.float().view(1, n_kv, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_logit], dim=-1)  # [b, kv, g, rows, keys + 1]
    weights = scores.softmax(dim=-1)[..., : k.shape[2]]  # the sink's column has no value
    out = weights @ v.float()[:, :, None]  # [b, kv, g, rows, d_v]
    return out.flatten(1, 2).to(q.dtype)


register(SERVING_NAME, policy_attention)


# ---------------------------------------------------------------------------------------------
# Needle accuracy under a policy


@torch.no_grad()
def greedy_answer(
    model: Model,
    trial: NeedleTrial,
    max_new_tokens: int = 40,
    stop_when_found: bool = True,
    context: int | None = None,
) -> tuple[list[int], float]:
    """Greedy response to a needle trial and the ROUGE-1 recall of its answer in it.

    The prompt is one forward, or with ``context`` two: its first ``context`` tokens (the
    prefill), then the rest (the question), as a serving client such as kvpress sends them. The
    cache is a ``DynamicCache()`` that keeps every key (sliding-window layers included), as
    :class:`CachePolicy` needs. Decoding stops at EOS, at a newline after some non-blank text,
    after ``max_new_tokens``, or (with ``stop_when_found``) as soon as the response holds every
    answer word.
    """
    hf, tokenizer = model.hf, model.tokenizer
    prompt = torch.as_tensor(trial.token_ids)[None].to(model.device)  # [1, length]
    steps = max(1, min(max_new_tokens, model.info.max_context - prompt.shape[1] + 1))
    generated: list[int] = []
    recall = 0.0
    cache = DynamicCache()
    if context is not None and 0 < context < prompt.shape[1]:
        hf(prompt[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        prompt = prompt[:, context:]
    out = hf(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
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
            past_key_values=cache,
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
    random_seed: int | Sequence[int] = 0,
    max_new_tokens: int = 40,
    prefill: str = "streamed",
    progress: Any = None,
) -> pd.DataFrame:
    """Needle accuracy and KV share per (length, policy).

    Args:
        maps: ``{name: [n_layers, n_kv_heads] bool}`` head maps to test (e.g. ``"retrieval
            top 0.25"``); each also gets a random map with as many full KV heads per seed of
            ``random_seed`` (one seed or several: one random map each), and ``"full"`` /
            ``"streaming only"`` are added.
        trials: needle trials (:mod:`workbench.tasks.needle`), any mix of lengths.
        prefill: ``"streamed"`` (the policy from the first token on, DuoAttention's) or
            ``"exact"`` (an exact prefill of the context, then the question and the answer see
            the compressed cache, kvpress's); the module docstring says which query sees what.
            ``"exact"`` needs trials that mark their ``question_start``.
        progress: a callable ``progress(done, total)`` or None.

    Returns:
        One row per (length, policy): ``length, policy, kind`` (map / random / baseline),
        ``prefill``, ``full_kv_heads``, ``full_fraction``, ``kv_kept`` (the mean over the
        length's trials), ``accuracy``, ``mean_recall``, ``trials``.
    """
    check_prefill(prefill)
    seeds = [random_seed] if isinstance(random_seed, int | np.integer) else list(random_seed)
    if not seeds:
        raise CaptureError("random_seed takes a seed or a non-empty list of seeds, got none")
    contexts = [trial.question_start if prefill == "exact" else None for trial in trials]
    if prefill == "exact" and None in contexts:
        raise CaptureError(
            "prefill='exact' runs the context and the question as two forwards; trial "
            f"{contexts.index(None)} does not mark where its question starts (question_start)"
        )
    shape = (model.info.n_layers, model.info.n_kv_heads)
    policies: list[tuple[str, str, np.ndarray]] = [("full", "baseline", np.ones(shape, bool))]
    for name, kv_full in maps.items():
        kv_full = np.asarray(kv_full, dtype=bool)
        if kv_full.shape != shape:
            raise ShapeError(f"map {name!r} is {kv_full.shape}, the model's KV heads {shape}")
        policies.append((name, "map", kv_full))
        policies += [
            (f"random ({int(kv_full.sum())} KV heads, seed {seed})", "random",
             random_map(shape, int(kv_full.sum()), seed))
            for seed in seeds
        ]  # fmt: skip
    policies.append(("streaming only", "baseline", np.zeros(shape, bool)))

    rows, done, total = [], 0, len(policies) * len(trials)
    for name, kind, kv_full in policies:
        policy = CachePolicy(kv_full, sink_size, recent_size, prefill)
        recalls: dict[int, list[float]] = {}
        kept: dict[int, list[float]] = {}
        with policy.applied(model.hf):
            for trial, context in zip(trials, contexts, strict=True):
                _, recall = greedy_answer(model, trial, max_new_tokens, context=context)
                length = len(trial.token_ids)
                recalls.setdefault(length, []).append(recall)
                kept.setdefault(length, []).append(policy.kv_kept(length, context))
                done += 1
                if progress is not None:
                    progress(done, total)
        for length, values in sorted(recalls.items()):
            rows.append(
                {
                    "length": length,
                    "policy": name,
                    "kind": kind,
                    "prefill": prefill,
                    "full_kv_heads": int(kv_full.sum()),
                    "full_fraction": round(policy.full_fraction, 4),
                    "kv_kept": round(float(np.mean(kept[length])), 4),
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
