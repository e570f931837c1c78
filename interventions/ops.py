"""The arithmetic of each intervention kind, once per capture path.

Pattern-level kinds exist twice: on a materialised pattern ``A [rows, head, q_pos, k_pos]``
(the TransformerLens path, ``hook_pattern``) and in closed form on post-RoPE ``q, k, v`` (the
streamed path), where no L×L tensor is formed:

* uniform: the output at query i is the mean of the visible values, ``cumsum(v)[i] / (i + 1)``
  when causal.
* first token: the output is ``v[0]``.
* redistribute (ACT): with ``m_S`` and ``o_S = Σ_{k∈S} A[i, k] v[k]`` the mass and output on the
  sink keys (from the row's log-sum-exp and the few sink scores) and ``m_R, o_R`` the same on
  the receiving keys, the new output is ``o − (1 − β)·o_S + g·o_R`` with
  ``g = (1 − β)·m_S / m_R``. Receivers default to all non-sink keys, where ``o_R = o − o_S`` and
  ``m_R = 1 − m_S``.
* patch pattern: attention with the reference run's q and k over the target run's v is exactly
  ``A_ref @ v``, so SDPA computes it in O(L) memory.

Output-level kinds act on ``z [rows, q_pos, head, d_head]`` (``hook_z``), the same tensor on
both paths. Tests hold the two forms of each pattern kind together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from interventions.specs import (
    FirstTokenAttention,
    Intervention,
    MeanAblation,
    PatchOutput,
    PatchPattern,
    Redistribute,
    ResampleAblation,
    ScaleOutput,
    UniformAttention,
    ZeroAblation,
)
from kernels import attention_stats, received_attention

# Redistribution leaves a row as it is when no receiving key is visible, or when the receiving
# mass is below this: on the streamed path ACT's receiving mass is 1 − m_S, exact only to ~1e-7
# in fp32, and dividing the freed mass by rounding noise would make up attention.
MIN_RECEIVING_MASS = 1e-6
# Elements of one query-chunk × key-subset score block on the streamed path.
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# Output level: z [rows, q_pos, head, d_head]


def new_output(
    spec: Intervention, z: Tensor, *, source: Tensor | None = None, mean: Tensor | None = None
) -> Tensor:
    """What the selected heads write instead of ``z [rows, q_pos, head, d_head]``.

    ``source`` is the same block from the reference run (resample, patch_output); ``mean`` is
    ``[head, d_head]`` (mean ablation).
    """
    if isinstance(spec, ZeroAblation):
        return torch.zeros_like(z)
    if isinstance(spec, ScaleOutput):
        return z * spec.factor
    if isinstance(spec, MeanAblation):
        assert mean is not None
        return mean.to(z)[None, None].expand_as(z)
    if isinstance(spec, (ResampleAblation, PatchOutput)):
        assert source is not None
        return source.to(z)
    raise TypeError(f"{spec.kind} does not act on the head output")


# ---------------------------------------------------------------------------------------------
# Key sets


def key_positions(positions: tuple[int, ...], k_len: int) -> list[int]:
    """Absolute key positions (negative counts from the end), clipped to the sequence."""
    resolved = [p + k_len if p < 0 else p for p in positions]
    return sorted({p for p in resolved if 0 <= p < k_len})


def sink_mask(spec: Redistribute, received: Tensor | None, k_len: int, *, causal: bool) -> Tensor:
    """Sink keys ``[rows, head, k_pos]`` bool (or ``[1, 1, k_pos]`` without a threshold).

    ``received [rows, head, k_pos]``: attention received by each key summed over every query.
    """
    explicit = torch.zeros(1, 1, k_len, dtype=torch.bool)
    explicit[..., key_positions(spec.sinks, k_len)] = True
    if spec.threshold is None:
        return explicit
    assert received is not None
    explicit = explicit.to(received.device)
    n_queries = (k_len - torch.arange(k_len, device=received.device)) if causal else k_len
    hidden = received / n_queries > spec.threshold  # ACT: Σ_i A[i, k] / (N − k) > threshold
    if spec.exclude_first:
        hidden[..., 0] = False
    return hidden | explicit


def receiver_mask(spec: Redistribute, k_len: int) -> Tensor | None:
    """``[k_pos]`` bool of the receiving spans, or None (every non-sink key receives)."""
    if spec.receivers is None:
        return None
    mask = torch.zeros(k_len, dtype=torch.bool)
    for start, end in spec.receivers:
        mask[start : min(end, k_len)] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Pattern level on a materialised pattern A [rows, head, q_pos, k_pos]


def visible_keys(q_len: int, k_len: int, *, causal: bool, device: torch.device) -> Tensor:
    """``[q_pos, k_pos]`` bool: which keys each query may see (queries are the last q_len)."""
    if not causal:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    q_abs = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= q_abs[:, None]


def new_pattern(
    spec: Intervention, pattern: Tensor, *, causal: bool, source: Tensor | None = None
) -> Tensor:
    """The selected heads' new pattern, from ``pattern [rows, head, q_pos, k_pos]``."""
    q_len, k_len = pattern.shape[-2:]
    if isinstance(spec, UniformAttention):
        visible = visible_keys(q_len, k_len, causal=causal, device=pattern.device).to(pattern)
        return (visible / visible.sum(-1, keepdim=True)).expand_as(pattern)
    if isinstance(spec, FirstTokenAttention):
        out = torch.zeros_like(pattern)
        out[..., 0] = 1.0
        return out
    if isinstance(spec, PatchPattern):
        assert source is not None
        return source.to(pattern)
    if isinstance(spec, Redistribute):
        received = pattern.sum(-2) if spec.threshold is not None else None
        sinks = sink_mask(spec, received, k_len, causal=causal).to(pattern.device)
        sinks = sinks[:, :, None, :]  # [rows|1, head|1, 1, k_pos]
        receivers = receiver_mask(spec, k_len)
        receiving = ~sinks if receivers is None else receivers.to(pattern.device) & ~sinks
        sink_mass = (pattern * sinks).sum(-1, keepdim=True)
        receiving_mass = (pattern * receiving).sum(-1, keepdim=True)
        visible = visible_keys(q_len, k_len, causal=causal, device=pattern.device)
        any_receiver = (receiving & visible).any(-1, keepdim=True)
        ok = any_receiver & (receiving_mass > MIN_RECEIVING_MASS)
        gain = (1 - spec.beta) * sink_mass / receiving_mass.clamp(min=MIN_RECEIVING_MASS)
        moved = torch.where(sinks, spec.beta * pattern, pattern + gain * pattern * receiving)
        return torch.where(ok, moved, pattern)
    raise TypeError(f"{spec.kind} does not act on the attention pattern")


# ---------------------------------------------------------------------------------------------
# Pattern level in closed form on q [rows, head, q_len, d], k/v [rows, head, k_len, d]
# (k and v already expanded to the selected query heads)


def new_attention_output(
    spec: Intervention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    source_qk: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The selected heads' attention output ``[rows, head, q_len, d_v]`` under ``spec``."""
    q_len, k_len = q.shape[2], k.shape[2]
    if isinstance(spec, UniformAttention):
        if not causal:
            return v.mean(2, keepdim=True).expand(-1, -1, q_len, -1)
        counts = torch.arange(1, k_len + 1, device=v.device, dtype=v.dtype)[:, None]
        return (v.cumsum(2) / counts)[:, :, k_len - q_len :]
    if isinstance(spec, FirstTokenAttention):
        return v[:, :, :1].expand(-1, -1, q_len, -1)
    if isinstance(spec, PatchPattern):
        assert source_qk is not None
        q_ref, k_ref = source_qk
        return F.scaled_dot_product_attention(
            q_ref.to(v), k_ref.to(v), v, scale=scale, is_causal=causal and q_len > 1
        )
    if isinstance(spec, Redistribute):
        return _redistributed_output(spec, q, k, v, causal=causal, scale=scale)
    raise TypeError(f"{spec.kind} does not act on the attention pattern")


def _redistributed_output(
    spec: Redistribute, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
) -> Tensor:
    k_len = k.shape[2]
    backend = "torch" if q.dtype == torch.float64 else "auto"  # the Triton kernels stop at fp32
    st = attention_stats(q, k, v, causal=causal, scale=scale, return_output=True, backend=backend)
    out, lse = st.output.to(v.dtype), st.lse  # [rows, head, q_len, d], [rows, head, q_len]
    received = None
    if spec.threshold is not None:
        received = received_attention(q, k, lse, causal=causal, scale=scale, backend=backend)
    sinks = sink_mask(spec, received, k_len, causal=causal).to(q.device)
    sinks = sinks.expand(q.shape[0], q.shape[1], -1)  # [rows, head, k_pos]
    sink_mass, sink_out = _subset_attention(q, k, v, lse, sinks, causal=causal, scale=scale)
    receivers = receiver_mask(spec, k_len)
    receiving = ~sinks if receivers is None else receivers.to(q.device)[None, None] & ~sinks
    if receivers is None:
        receiving_mass, receiving_out = 1 - sink_mass, out - sink_out
    else:
        receiving_mass, receiving_out = _subset_attention(
            q, k, v, lse, receiving, causal=causal, scale=scale
        )
    ok = _any_visible(receiving, q.shape[2], causal=causal) & (receiving_mass > MIN_RECEIVING_MASS)
    ok = ok[..., None]
    gain = ((1 - spec.beta) * sink_mass / receiving_mass.clamp(min=MIN_RECEIVING_MASS))[..., None]
    moved = out - (1 - spec.beta) * sink_out + gain * receiving_out
    return torch.where(ok, moved, out)


def _any_visible(keys: Tensor, q_len: int, *, causal: bool) -> Tensor:
    """``[rows, head, q_len]`` bool: whether each query sees at least one key of ``keys
    [rows, head, k_len]`` (the queries are the last q_len positions)."""
    k_len = keys.shape[-1]
    if not causal:
        return keys.any(-1, keepdim=True).expand(-1, -1, q_len)
    seen = keys.cumsum(-1)[..., k_len - q_len :]  # keys at or before each query's position
    return seen > 0


def _subset_attention(
    q: Tensor, k: Tensor, v: Tensor, lse: Tensor, keys: Tensor, *, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Mass ``[rows, head, q_len]`` and output ``[rows, head, q_len, d_v]`` of the attention
    that each query pays to the keys in ``keys [rows, head, k_len]`` (bool), from the row's
    log-sum-exp: only the selected keys' scores are formed, a chunk of queries at a time."""
    rows, heads, q_len, _ = q.shape
    k_len, d_v = k.shape[2], v.shape[-1]
    n_keys = int(keys.sum(-1).max()) if keys.numel() else 0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 accumulation
    mass = torch.zeros(rows, heads, q_len, device=q.device, dtype=acc)
    out = torch.zeros(rows, heads, q_len, d_v, device=q.device, dtype=acc)
    if n_keys == 0:
        return mass, out.to(v.dtype)
    # indices of the selected keys first (stable), padded with unselected ones marked invalid
    index = torch.argsort((~keys).to(torch.int8), dim=-1, stable=True)[..., :n_keys]
    valid = keys.gather(-1, index)  # [rows, head, n_keys]
    k_sel = k.gather(2, index[..., None].expand(-1, -1, -1, k.shape[-1])).to(acc)
    v_sel = v.gather(2, index[..., None].expand(-1, -1, -1, d_v)).to(acc)
    q_abs = torch.arange(k_len - q_len, k_len, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, rows * heads * n_keys))
    for start in range(0, q_len, step):
        stop = min(q_len, start + step)
        scores = torch.einsum("rhqd,rhnd->rhqn", q[:, :, start:stop].to(acc), k_sel) * scale
        allowed = valid[:, :, None, :]
        if causal:
            allowed = allowed & (index[:, :, None, :] <= q_abs[start:stop, None])
        p = torch.where(allowed, torch.exp(scores - lse[:, :, start:stop, None]), 0.0)
        mass[:, :, start:stop] = p.sum(-1)
        out[:, :, start:stop] = p @ v_sel
    return mass, out.to(v.dtype)
