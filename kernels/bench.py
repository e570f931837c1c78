"""Benchmark of the statistics kernels against SDPA and a naive materialised softmax.

``python -m kernels.bench`` (CUDA GPU) times, in one process and on the same bf16 inputs
(B=1, H=32 query heads, causal):

- ``sdpa``: ``F.scaled_dot_product_attention`` forward on the flash backend (the reference);
- ``cudnn``: the same on the cuDNN backend, where it runs;
- ``naive``: materialise ``softmax(QKᵀ)`` in fp32 and reduce it, until it runs out of memory;
- ``stats``: `kernels.attention_stats` (sink 4, recent window 256, one 64-key span);
- ``stats+recv``: that plus `kernels.received_attention`;
- ``stats+out``: `kernels.attention_stats` with ``return_output=True``.

Each row gives the median time (``triton.testing.do_bench``), the ratio to ``sdpa``, TFLOP/s
(``2·B·H·L²·d`` per QKᵀ or PV product, halved for causal: SDPA does two products, the stats pass
one, stats+recv two, stats+out two), the peak memory allocated beyond q/k/v, and for L ≤ 4K the
largest absolute error of any statistic against the fp32 torch reference on the same inputs.

It writes ``benchmarks/results/<device>.json`` and the tables between the markers in
``docs/benchmarks.md``.

Attention variants (``--variants`` runs only these; ``--variant-lengths`` overrides their
lengths): H=32, 8 KV heads, d=128, causal, bf16, rows ``stats``, ``stats+out`` and ``flex`` --
FlexAttention (``torch.compile``'d ``flex_attention``, ``create_block_mask(..., _compile=True)``)
with the same mask and score_mod -- for a sliding window of 4096 keys at L = 8K/16K/32K/128K,
softcap 30 and learned sinks at 8K/16K/32K. Where flex attention is missing (older torch) its
rows record the error and the rest still runs. TFLOP/s count only the (query, key) pairs the
mask keeps. At each variant's shortest length the rows carry the errors against the fp32
reference and the largest difference between flex's output and ours. They go to
``benchmarks/results/<device>-variants.json`` and their own marker block in the docs.

``--check`` runs GPU correctness checks only (the variants included: window, bidirectional
window, chunks, softcap, learned sinks, d_v != d_qk, ALiBi); without a GPU it is a dry run
whose two sides are both the torch reference, which exercises the cases' plumbing. ``--sweep``
times block configurations.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import attention_stats, received_attention, reference, top_keys
from workbench.arguments import Parser, integer, output_dir, output_file
from workbench.atomic import atomic_write_text

# the package re-exports functions under the submodules' names; fetch the modules themselves
stats_module = importlib.import_module("kernels.attention_stats")
received_module = importlib.import_module("kernels.received")

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (1024, 4096, 8192, 16384, 32768, 131072)
SHAPES = ((32, 128), (8, 128), (32, 64), (8, 64))  # (n_kv_heads, d_head) with 32 query heads
N_HEADS = 32
STATS_KW = dict(sink_size=4, recent_window=256)
FIELDS = ("lse", "entropy", "max_prob", "sink_mass", "outside_mass", "span_mass")
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


def device_slug() -> str:
    name = torch.cuda.get_device_name().lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _inputs(length: int, n_kv: int, d: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, N_HEADS, length, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, n_kv, length, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, n_kv, length, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def _spans(length: int) -> list[list[int]]:
    start = length // 3
    return [[start, start + 64]]


def _time(fn: Callable[[], object]) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    # at least ~5 timed runs even for 100+ ms calls
    return triton.testing.do_bench(fn, warmup=max(25, once), rep=max(100, 5 * once),
                                   return_mode="median")  # fmt: skip


def _peak_extra(fn: Callable[[], object]) -> float:
    """GiB allocated at peak beyond what was allocated before ``fn`` (q, k, v)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**30


def _sdpa(q, k, v, backend) -> tuple[Callable[[], torch.Tensor], str | None]:
    """SDPA forward on one backend, and a note when it cannot read grouped K/V directly.

    With grouped-query attention the call passes ``enable_gqa``; a backend that refuses it is
    given K/V repeated to every query head beforehand (outside the timing), as Hugging Face's
    ``repeat_kv`` would, which favours SDPA.
    """

    def call(kk, vv, gqa):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

        return run

    if q.shape[1] == k.shape[1]:
        return call(k, v, False), None
    run = call(k, v, True)
    try:
        run()
        return run, None
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return call(kk, vv, False), "K/V repeated before the call (no enable_gqa kernel)"


def _naive(q, k) -> Callable[[], tuple]:
    """softmax(QKᵀ) materialised in fp32, then the statistics by plain reductions."""

    def run():
        length = q.shape[2]
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q @ kk.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [1, H, L, L]
        s.masked_fill_(torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1),
                       -math.inf)  # fmt: skip
        p = s.softmax(-1)
        del s
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        max_prob, argmax = p.max(-1)
        sink = p[..., :4].sum(-1)
        return entropy, max_prob, argmax, sink

    return run


def _max_error(q, k, length: int) -> dict[str, float]:
    spans = _spans(length)
    got = attention_stats(q, k, spans=spans, **STATS_KW)
    want = reference.attention_stats(q.float(), k.float(), spans=spans, **STATS_KW)
    err = {name: (getattr(got, name) - getattr(want, name)).abs().max().item() for name in FIELDS}
    err["argmax_agree"] = (got.argmax == want.argmax).float().mean().item()
    recv = received_attention(q, k, got.lse)
    recv_ref = reference.received_attention(q.float(), k.float(), want.lse)
    err["received"] = (recv - recv_ref).abs().max().item()
    return err


def _methods(q, k, v, spans) -> dict[str, Callable[[], tuple[Callable[[], object], int, str]]]:
    """name -> builder of (call, number of causal L×L products it does, note)."""

    def stats():
        return attention_stats(q, k, spans=spans, **STATS_KW)

    def with_output():
        return attention_stats(q, k, v, spans=spans, return_output=True, **STATS_KW)

    def sdpa(backend):
        def build():
            run, note = _sdpa(q, k, v, backend)
            return run, 2, note

        return build

    return {
        "sdpa": sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "naive": lambda: (_naive(q, k), 1, None),
        "stats": lambda: (stats, 1, None),
        "stats+recv": lambda: (lambda: received_attention(q, k, stats().lse), 2, None),
        "stats+out": lambda: (with_output, 2, None),
    }


def bench_length(n_kv: int, d: int, length: int, *, naive: bool, log) -> list[dict]:
    q, k, v = _inputs(length, n_kv, d)
    product = 2 * N_HEADS * length * length * d / 2  # FLOPs of one causal QKᵀ or PV product
    rows, sdpa_ms, cudnn_ms = [], None, None
    for method, build in _methods(q, k, v, _spans(length)).items():
        if method == "naive" and not naive:
            continue
        row = dict(n_heads=N_HEADS, n_kv_heads=n_kv, d_head=d, length=length, method=method)
        try:
            fn, products, note = build()
            if note:
                row["note"] = note
            row["peak_extra_gib"] = _peak_extra(fn)
            row["ms"] = _time(fn)
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as e:  # e.g. no cuDNN kernel for this shape; recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        fn = None  # drop the closure's tensors before the next method
        torch.cuda.empty_cache()
        if "ms" in row:
            sdpa_ms = row["ms"] if method == "sdpa" else sdpa_ms
            cudnn_ms = row["ms"] if method == "cudnn" else cudnn_ms
            row["tflops"] = products * product / row["ms"] / 1e9
            if sdpa_ms:
                row["ratio_to_sdpa"] = row["ms"] / sdpa_ms
            if cudnn_ms:
                row["ratio_to_cudnn"] = row["ms"] / cudnn_ms
        rows.append(row)
        log(row)
    if length <= 4096:
        err = _max_error(q, k, length)
        for row in rows:
            if row["method"].startswith("stats"):
                row["max_error"] = err
    return rows


def bench_shape(n_kv: int, d: int, lengths: tuple[int, ...], log) -> list[dict]:
    rows: list[dict] = []
    naive = True  # until it runs out of memory
    for length in lengths:
        rows += bench_length(n_kv, d, length, naive=naive, log=log)
        naive = naive and not any(
            r["method"] == "naive" and r.get("error") == "out of memory" for r in rows
        )
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Attention variants next to FlexAttention.

VARIANT_SHAPE = (8, 128)  # (n_kv_heads, d_head) of the variant rows, with 32 query heads
VARIANTS: dict[str, tuple[dict, tuple[int, ...]]] = {  # name -> (kernel keywords, lengths)
    "causal": (dict(), (8192, 16384, 32768)),  # the plain pass the variants are compared with
    "window 4096": (dict(window=4096), (8192, 16384, 32768, 131072)),
    "softcap 30": (dict(softcap=30.0), (8192, 16384, 32768)),
    "learned sinks": (dict(sinks=True), (8192, 16384, 32768)),  # drawn per head
}
VARIANT_METHODS = ("stats", "stats+out", "flex")
VARIANT_MARK_START = "<!-- bench-variants:start -->"
VARIANT_MARK_END = "<!-- bench-variants:end -->"


def _variant_kwargs(spec: dict) -> dict:
    """The kernel keyword arguments of a variant; ``sinks=True`` becomes per-head logits."""
    kw = dict(spec)
    if kw.get("sinks"):
        g = torch.Generator(device="cuda").manual_seed(2)
        kw["sinks"] = 2 * torch.randn(N_HEADS, device="cuda", generator=g)
    return kw


def _visible_pairs(length: int, window: int | None) -> int:
    """(query, key) pairs of a causal pass: ``L(L+1)/2``, or ``Σ_p min(p + 1, W)`` in a window."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


@functools.cache
def _flex_functions() -> tuple[Callable, Callable]:
    """(compiled flex_attention, create_block_mask); ImportError where flex attention is missing."""
    # imported lazily: flex attention exists from torch 2.5 on and compiles through inductor
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # one compilation per length and variant: more than dynamo's default cache holds
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _flex(q, k, v, kw: dict) -> Callable[[], torch.Tensor]:
    """FlexAttention's causal forward with the variant's mask and score_mod: a window as a
    block mask (``create_block_mask(..., _compile=True)``, so whole blocks are skipped), softcap
    as a score_mod, learned sinks the way transformers' flex integration adds them (the output
    rescaled by ``exp(lse - logaddexp(lse, sink))``)."""
    flex, create_block_mask = _flex_functions()
    window, softcap, sinks = kw.get("window"), kw.get("softcap"), kw.get("sinks")

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        if window is not None:
            visible = visible & (q_idx - kv_idx < window)
        return visible

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    length = q.shape[2]
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length,
                                   device=q.device, _compile=True)  # fmt: skip
    options = dict(score_mod=None if softcap is None else capped, block_mask=block_mask,
                   enable_gqa=True)  # fmt: skip

    def run():
        if sinks is None:
            return flex(q, k, v, **options)
        out, lse = flex(q, k, v, return_lse=True, **options)  # lse [1, H, L], natural log
        keep = torch.exp(lse - torch.logaddexp(lse, sinks[None, :, None]))
        return out * keep[..., None].to(out.dtype)

    return run


def _variant_error(q, k, v, kw: dict, spans) -> dict[str, float]:
    """Largest absolute error of each statistic and of the output against the fp32 reference,
    and the largest difference between FlexAttention's output and ours."""
    got = attention_stats(q, k, v, spans=spans, return_output=True, **STATS_KW, **kw)
    want = reference.attention_stats(q.float(), k.float(), v.float(), spans=spans,
                                     return_output=True, **STATS_KW, **kw)  # fmt: skip
    err = {
        name: (getattr(got, name).float() - getattr(want, name).float()).abs().max().item()
        for name in (*FIELDS, "output", "learned_sink_mass")
        if getattr(want, name) is not None
    }
    err["argmax_agree"] = (got.argmax == want.argmax).float().mean().item()
    try:
        flex_out = _flex(q, k, v, kw)()
        err["flex_vs_ours"] = (flex_out.float() - got.output.float()).abs().max().item()
    except Exception:  # no flex attention here: the timing rows say why
        pass
    return err


def _variant_methods(q, k, v, kw: dict, spans) -> dict[str, Callable[[], tuple[Callable, int]]]:
    """method -> builder of (call, number of QKᵀ or PV products it does)."""

    def stats():
        return attention_stats(q, k, spans=spans, **STATS_KW, **kw)

    def with_output():
        return attention_stats(q, k, v, spans=spans, return_output=True, **STATS_KW, **kw)

    return {
        "stats": lambda: (stats, 1),
        "stats+out": lambda: (with_output, 2),
        "flex": lambda: (_flex(q, k, v, kw), 2),
    }


def bench_variant(name: str, lengths: tuple[int, ...], log) -> list[dict]:
    """Rows of one of `VARIANTS`: its lengths (``lengths`` if given) x `VARIANT_METHODS`, the
    error columns at the shortest length."""
    n_kv, d = VARIANT_SHAPE
    spec, own_lengths = VARIANTS[name]
    rows: list[dict] = []
    for length in lengths or own_lengths:
        q, k, v = _inputs(length, n_kv, d)
        kw, spans = _variant_kwargs(spec), _spans(length)
        product = 2 * N_HEADS * _visible_pairs(length, kw.get("window")) * d
        builders = _variant_methods(q, k, v, kw, spans)
        found = []
        for method in VARIANT_METHODS:
            row = dict(variant=name, n_heads=N_HEADS, n_kv_heads=n_kv, d_head=d,
                       length=length, method=method)  # fmt: skip
            try:
                fn, products = builders[method]()
                row["peak_extra_gib"] = _peak_extra(fn)
                row["ms"] = _time(fn)
                row["tflops"] = products * product / row["ms"] / 1e9
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:  # e.g. no flex attention in this torch; recorded
                first = str(e).splitlines()[0][:160] if str(e) else ""
                row["error"] = f"{type(e).__name__}: {first}"
            fn = None  # drop the closure's tensors before the next method
            torch.cuda.empty_cache()
            found.append(row)
        flex_ms = found[-1].get("ms")
        for row in found:
            if flex_ms and "ms" in row:
                row["ratio_to_flex"] = row["ms"] / flex_ms
            log(row)
        if length == min(lengths or own_lengths):
            err = _variant_error(q, k, v, kw, spans)
            for row in found:
                row["max_error"] = err
        rows += found
    return rows


def _variant_table(rows: list[dict]) -> str:
    n_kv, d = VARIANT_SHAPE
    lines = [
        f"**Attention variants, H={N_HEADS}, KV heads={n_kv}, d={d}, causal** (ms, ×flex)",
        "",
        "| variant | L | " + " | ".join(VARIANT_METHODS)
        + " | stats ×causal stats | stats+out TFLOP/s | peak extra (stats+out) | max err"
        " | flex vs ours |",
        "|" + "---|" * (len(VARIANT_METHODS) + 7),
    ]  # fmt: skip
    by = {(r["variant"], r["length"], r["method"]): r for r in rows}
    for name in VARIANTS:
        for length in sorted({r["length"] for r in rows if r["variant"] == name}):
            cells = []
            for method in VARIANT_METHODS:
                r = by.get((name, length, method), {})
                if "ms" not in r:
                    cells.append("OOM" if r.get("error") == "out of memory" else "n/a")
                elif method == "flex" or "ratio_to_flex" not in r:
                    cells.append(f"{r['ms']:.3f}")
                else:
                    cells.append(f"{r['ms']:.3f} ({r['ratio_to_flex']:.2f}×)")
            plain = by.get(("causal", length, "stats"), {}).get("ms")
            own = by.get((name, length, "stats"), {}).get("ms")
            cells.append("–" if not (plain and own) else f"{own / plain:.2f}×")
            out = by.get((name, length, "stats+out"), {})
            err = dict(out.get("max_error", {}))
            flex_diff = err.pop("flex_vs_ours", None)
            err.pop("argmax_agree", None)
            worst = f"{max(err.values()):.1e}" if err else "–"
            flex_diff = "–" if flex_diff is None else f"{flex_diff:.1e}"
            lines.append(
                f"| {name} | {_length_label(length)} | " + " | ".join(cells)
                + f" | {out.get('tflops', 0):.0f}"
                + f" | {out.get('peak_extra_gib', float('nan')):.2f} GiB | {worst} | {flex_diff} |"
            )  # fmt: skip
    return "\n".join(lines)


def _check_variant(case: dict, n_heads: int, device: str, g: torch.Generator) -> dict:
    """The attention-variant keyword arguments of a check case (learned sinks and ALiBi slopes
    drawn per head)."""
    kw = dict(case.get("variant", {}))
    if case.get("sinks"):
        kw["sinks"] = 2 * torch.randn(n_heads, device=device, generator=g)
    if case.get("alibi"):
        kw["alibi_slopes"] = 0.1 * torch.rand(n_heads, device=device, generator=g)
    return kw


# each case compiles its own kernel variants (~10 s apiece), so they are few
CHECK_CASES = [
    dict(dtype=torch.float32, causal=True, n_kv=2, length=1000, d=128, tol=1e-4),
    dict(dtype=torch.float32, causal=False, n_kv=4, length=333, d=80, tol=1e-4),
    dict(dtype=torch.bfloat16, causal=True, n_kv=1, length=2047, d=128, tol=2e-2),
    dict(dtype=torch.float16, causal=True, n_kv=4, length=1, d=64, tol=1e-2),
    dict(dtype=torch.bfloat16, causal=True, n_kv=2, length=3000, d=64, tol=2e-2, subset=300),
    # attention variants: Mistral-style window, ModernBERT's local layers (W = 64 + 1), Llama 4
    # chunks, Gemma 2 (d=256, softcap 50, window), gpt-oss (d=64, window 128, learned sinks),
    # DeepSeek-V3 MLA (d_qk 192, d_v 128), BLOOM-style ALiBi
    dict(dtype=torch.bfloat16, causal=True, n_kv=2, length=3000, d=128, tol=2e-2,
         variant=dict(window=512)),
    dict(dtype=torch.float32, causal=False, n_kv=4, length=1000, d=64, tol=1e-4,
         variant=dict(window=65)),
    dict(dtype=torch.bfloat16, causal=True, n_kv=2, length=2500, d=128, tol=2e-2,
         variant=dict(chunk=1024)),
    dict(dtype=torch.float16, causal=True, n_kv=2, length=1500, d=256, tol=2e-2,
         variant=dict(softcap=50.0, window=400)),
    dict(dtype=torch.bfloat16, causal=True, n_kv=1, length=2000, d=64, tol=2e-2, sinks=True,
         variant=dict(window=128)),
    dict(dtype=torch.bfloat16, causal=True, n_kv=1, length=1500, d=192, d_v=128, tol=2e-2),
    dict(dtype=torch.float32, causal=True, n_kv=4, length=1200, d=64, tol=1e-4, alibi=True),
    # decoding: one query against 4K keys (the keys are split into shares, `key_splits`), and
    # with learned sinks and a softcap (the merge adds the sink, the hardware tanh runs)
    dict(dtype=torch.bfloat16, causal=True, n_kv=2, length=4096, d=128, tol=2e-2, subset=1),
    dict(dtype=torch.bfloat16, causal=True, n_kv=1, length=4096, d=64, tol=2e-2, subset=1,
         sinks=True, variant=dict(softcap=30.0)),
]  # fmt: skip


def check(device: str = "cuda") -> bool:
    """GPU correctness: Triton kernels against the torch reference on CUDA tensors (on the CPU
    both sides are the reference: a dry run of this function)."""
    ok = True
    for case in CHECK_CASES:
        d, d_v = case["d"], case.get("d_v", case["d"])
        g = torch.Generator(device=device).manual_seed(1)
        length = case["length"]
        shape = dict(device=device, generator=g)
        q = torch.randn(2, 4, length, d, **shape).to(case["dtype"])
        k = torch.randn(2, case["n_kv"], length, d, **shape).to(case["dtype"])
        v = torch.randn(2, case["n_kv"], length, d_v, **shape).to(case["dtype"])
        pad = torch.ones(2, length, dtype=torch.bool, device=device)
        pad[0, : length // 5] = False
        spans = [[3, 50], [length // 2, length]]
        positions = None
        if case.get("subset"):  # answer-token style: a sorted query subset over all keys
            positions = torch.randperm(length, device=device, generator=g)[: case["subset"]]
            positions = positions.sort().values
            q = q[:, :, positions]
        variant = _check_variant(case, 4, device, g)
        kw = dict(causal=case["causal"], key_padding_mask=pad, spans=spans,
                  q_positions=positions, **STATS_KW, **variant)  # fmt: skip
        got = attention_stats(q, k, v, return_output=True, **kw)
        want = reference.attention_stats(q.float(), k.float(), v.float(), return_output=True,
                                         **kw)  # fmt: skip
        qmask = torch.rand(2, q.shape[2], device=device, generator=g) < 0.5
        common = dict(causal=case["causal"], key_padding_mask=pad, query_mask=qmask,
                      q_positions=positions, **variant)  # fmt: skip
        recv = received_attention(q, k, got.lse, **common)
        recv_ref = reference.received_attention(q.float(), k.float(), want.lse, **common)
        tk = dict(causal=case["causal"], key_padding_mask=pad, q_positions=positions, **variant)
        p_top, i_top = top_keys(q, k, got.lse, k_top=8, **tk)
        p_ref, i_ref = reference.top_keys(q.float(), k.float(), want.lse, k_top=8, **tk)
        errs = {"received": (recv - recv_ref).abs().max().item(),
                "top_keys": (p_top - p_ref).abs().max().item()}  # fmt: skip
        for name in (*FIELDS, "output", "learned_sink_mass"):
            if getattr(want, name) is None:
                continue
            x, y = getattr(got, name).float(), getattr(want, name).float()
            fin = torch.isfinite(y)
            bad = not torch.equal(torch.isfinite(x), fin)
            errs[name] = math.inf if bad else (x[fin] - y[fin]).abs().max().item()
        agree = (got.argmax == want.argmax).float().mean().item()
        top_agree = (i_top == i_ref).float().mean().item()  # near-ties may swap in 16 bits
        worst = max(errs.values())
        passed = worst <= case["tol"]
        ok &= passed
        extra = [f"{key}={val}" for key, val in case.get("variant", {}).items()]
        extra += [name for name in ("sinks", "alibi") if case.get(name)]
        print(f"check {case['dtype']} causal={case['causal']} L={length} d={d} d_v={d_v} "
              f"queries={q.shape[2]} kv={case['n_kv']}{''.join(' ' + e for e in extra)}: "
              f"worst={worst:.2e} argmax_agree={agree:.4f} top_keys_agree={top_agree:.4f} "
              f"{'ok' if passed else 'FAIL ' + str(errs)}", flush=True)  # fmt: skip
    return ok


def _sweep_calls(q, k, v, a, lse, cfg) -> dict[str, Callable[[], object]]:
    return {
        "stats": lambda: stats_module._triton_stats(
            q, k, None, a, causal=True, return_output=False, config=cfg, **STATS_KW
        ),
        "stats+out": lambda: stats_module._triton_stats(
            q, k, v, a, causal=True, return_output=True, config=cfg, **STATS_KW
        ),
    }


SWEEP_TILES = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3))


def sweep(length: int, log: Callable[[dict], None]) -> list[dict]:
    """Time block configurations of the kernels (bf16, causal, H=32, n_kv=8) against cuDNN SDPA:
    statistics and stats+out on `SWEEP_TILES`, received attention on its own candidates."""
    rows = []

    def record(**row) -> None:
        rows.append(row)
        log(row)

    for d in (128, 64):
        q, k, v = _inputs(length, 8, d)
        a = reference.check_args(
            q, k, scale=None, q_positions=None, key_padding_mask=None, spans=_spans(length),
            **STATS_KW,
        )  # fmt: skip
        lse = attention_stats(q, k).lse
        cudnn, _ = _sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
        record(d=d, length=length, method="cudnn", ms=_time(cudnn))
        for tile in SWEEP_TILES:
            for name, fn in _sweep_calls(q, k, v, a, lse, tile).items():
                try:
                    ms = _time(fn)
                except Exception as e:  # a config over the shared-memory or register limits
                    ms = type(e).__name__
                record(d=d, length=length, method=name, config=tile, ms=ms)
        for tile in ((64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3)):
            fn = functools.partial(
                received_module._triton_received, q, k, lse, a, causal=True, query_mask=None,
                config=tile,
            )  # fmt: skip
            record(d=d, length=length, method="received", config=tile, ms=_time(fn))
    return rows


def _length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _table(rows: list[dict], n_kv: int, d: int) -> str:
    by = {
        (r["length"], r["method"]): r for r in rows if r["n_kv_heads"] == n_kv and r["d_head"] == d
    }
    lengths = sorted({r["length"] for r in rows})
    methods = ("sdpa", "cudnn", "naive", "stats", "stats+recv", "stats+out")
    head = ("| L | " + " | ".join(methods) + " | stats TFLOP/s | ×cuDNN: stats, +out, +recv"
            " | peak extra (stats+recv) | max err |")  # fmt: skip
    lines = [f"**H={N_HEADS}, KV heads={n_kv}, d={d}** (ms, ×SDPA flash)", "", head,
             "|" + "---|" * (len(methods) + 5)]  # fmt: skip
    for length in lengths:
        cells = []
        for m in methods:
            r = by.get((length, m))
            if r is None:
                cells.append("–")
            elif "ms" not in r:
                cells.append("OOM" if r.get("error") == "out of memory" else "n/a")
            elif "ratio_to_sdpa" not in r or m == "sdpa":
                cells.append(f"{r['ms']:.3f}" + ("*" if r.get("note") else ""))
            else:
                star = "*" if r.get("note") else ""
                cells.append(f"{r['ms']:.3f}{star} ({r['ratio_to_sdpa']:.2f}×)")
        st, sr = by.get((length, "stats"), {}), by.get((length, "stats+recv"), {})
        to_cudnn = ", ".join(
            f"{by[(length, m)]['ratio_to_cudnn']:.2f}"
            if "ratio_to_cudnn" in by.get((length, m), {}) else "–"
            for m in ("stats", "stats+out", "stats+recv")
        )  # fmt: skip
        err = st.get("max_error")
        worst = (
            "–" if err is None else f"{max(v for k, v in err.items() if k != 'argmax_agree'):.1e}"
        )
        lines.append(
            f"| {_length_label(length)} | " + " | ".join(cells)
            + f" | {st.get('tflops', 0):.0f} | {to_cudnn}"
            + f" | {sr.get('peak_extra_gib', float('nan')):.2f} GiB"
            + f" | {worst} |"
        )  # fmt: skip
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's speed and memory targets, each with its worst case over the shapes."""

    def worst(method: str, keep, key: str, pick) -> tuple[float, str]:
        found = [r for r in rows if r["method"] == method and keep(r) and key in r]
        if not found:
            return math.nan, "not measured"
        r = pick(found, key=lambda r: r[key])
        return r[key], f"kv={r['n_kv_heads']} d={r['d_head']} L={_length_label(r['length'])}"

    long = lambda r: r["length"] >= 4096  # noqa: E731
    from_8k = lambda r: r["length"] >= 8192  # noqa: E731
    from_16k_d128 = lambda r: r["length"] >= 16384 and r["d_head"] == 128  # noqa: E731
    from_16k_d64 = lambda r: r["length"] >= 16384 and r["d_head"] == 64  # noqa: E731
    at_128k = lambda r: r["length"] == 131072  # noqa: E731
    at_8k = lambda r: r["length"] == 8192  # noqa: E731
    checks = [
        ("stats ≤ 1.0× SDPA at L ≥ 4K", *worst("stats", long, "ratio_to_sdpa", max), "<=", 1.0),
        ("stats + received ≤ 2.0× SDPA at L ≥ 4K",
         *worst("stats+recv", long, "ratio_to_sdpa", max), "<=", 2.0),
        ("stats at 128K: < 2 GiB beyond q/k/v",
         *worst("stats", at_128k, "peak_extra_gib", max), "<", 2.0),
        ("stats + received at 128K: < 2 GiB beyond q/k/v",
         *worst("stats+recv", at_128k, "peak_extra_gib", max), "<", 2.0),
        ("naive ≥ 20× SDPA at 8K", *worst("naive", at_8k, "ratio_to_sdpa", min), ">=", 20.0),
        # issue 19 (Hopper-class speed), against cuDNN SDPA
        ("stats ≥ 500 TFLOP/s of QKᵀ at L ≥ 16K, d=128",
         *worst("stats", from_16k_d128, "tflops", min), ">=", 500.0),
        ("stats ≤ 0.6× cuDNN at L ≥ 16K, d=128",
         *worst("stats", from_16k_d128, "ratio_to_cudnn", max), "<=", 0.6),
        ("stats ≤ 0.6× cuDNN at L ≥ 16K, d=64",
         *worst("stats", from_16k_d64, "ratio_to_cudnn", max), "<=", 0.6),
        ("stats + output ≤ 1.05× cuDNN at L ≥ 8K",
         *worst("stats+out", from_8k, "ratio_to_cudnn", max), "<=", 1.05),
        ("stats + received ≤ 1.3× cuDNN at L ≥ 8K",
         *worst("stats+recv", from_8k, "ratio_to_cudnn", max), "<=", 1.3),
    ]  # fmt: skip
    ops = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b}
    return [  # met is None where this run did not measure the target (e.g. no 128K length)
        dict(
            target=name,
            worst=value,
            where=where,
            met=None if math.isnan(value) else bool(ops[op](value, bound)),
        )
        for name, value, where, op, bound in checks
    ]


def write_docs(result: dict, path: Path) -> None:
    """Replace the text between the bench markers of ``path`` with the result's tables."""
    rows = result["rows"]
    body = [
        f"Device: **{result['device_name']}**; torch {result['torch']}, triton "
        f"{result['triton']}; {result['date']}.",
        f"Command: `{result['command']}`",
        "",
        "| target | worst case | where | met |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        met = "not measured" if t["met"] is None else "yes" if t["met"] else "NO"
        body.append(f"| {t['target']} | {t['worst']:.2f} | {t['where']} | {met} |")
    body += ["", "Times in ms (median), ratio to SDPA flash in brackets; * = see note in JSON.", ""]
    for n_kv, d in sorted({(r["n_kv_heads"], r["d_head"]) for r in rows}, key=SHAPES.index):
        body += [_table(rows, n_kv, d), ""]
    _replace_block(path, MARK_START, MARK_END, body)


def write_variant_docs(result: dict, path: Path) -> None:
    """Replace the text between the variant markers of ``path`` with the variant table."""
    body = [
        f"Device: **{result['device_name']}**; torch {result['torch']}, triton "
        f"{result['triton']}; {result['date']}.",
        f"Command: `{result['command']}`",
        "",
        "Times in ms (median), ratio to FlexAttention (compiled, same block mask and score_mod)"
        " in brackets; TFLOP/s count only the (query, key) pairs the mask keeps; errors at each"
        " variant's shortest length: stats and output against the fp32 reference, and flex's"
        " output against ours.",
        "",
        _variant_table(result["rows"]),
        "",
    ]
    _replace_block(path, VARIANT_MARK_START, VARIANT_MARK_END, body)


def _replace_block(path: Path, start: str, end: str, body: list[str]) -> None:
    """Write ``body`` between the markers ``start`` and ``end`` of ``path`` (appended with its
    markers where they are missing); the rest of the file is kept."""
    block = start + "\n" + "\n".join(body) + end
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text += "\n" + block + "\n"
    atomic_write_text(path, text)


def build_parser() -> Parser:
    parser = Parser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=integer(1), nargs="*", default=list(LENGTHS))
    parser.add_argument("--kv-heads", type=integer(1), nargs="*",
                        choices=sorted({n for n, _ in SHAPES}),
                        help="only the shapes with these KV-head counts")  # fmt: skip
    parser.add_argument("--out", type=output_dir, default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--docs", type=output_file, default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--check", action="store_true", help="correctness checks only")
    parser.add_argument("--sweep", type=integer(1), metavar="L",
                        help="time block configs at length L")  # fmt: skip
    parser.add_argument(
        "--variants",
        action="store_true",
        help="only the attention-variant rows (window, softcap, learned sinks)",
    )
    parser.add_argument("--variant-lengths", type=integer(1), nargs="*",
                        help="lengths of the variant rows (default: each variant's)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out, args.docs = Path(args.out), Path(args.docs)
    if not torch.cuda.is_available():
        if args.check:
            print("no CUDA GPU: a dry run of the checks, both sides the torch reference",
                  file=sys.stderr)  # fmt: skip
            return 0 if check("cpu") else 1
        print("kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.check:
        return 0 if check() else 1
    if args.sweep:
        rows = sweep(args.sweep, log=lambda r: print(json.dumps(r), flush=True))
        path = args.out / f"{device_slug()}-sweep-{args.sweep}.json"
        atomic_write_text(path, json.dumps({"command": f"python -m kernels.bench --sweep "
                                            f"{args.sweep}", "rows": rows}, indent=1))  # fmt: skip
        return 0
    import triton

    about = {
        "device_name": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "stats_kwargs": {**STATS_KW, "spans": "one 64-key span at L/3"},
    }
    if not args.variants:
        _bench_main(args, about)
    command = "python -m kernels.bench" + " --variants" * args.variants
    if args.variant_lengths:
        command += " --variant-lengths " + " ".join(map(str, args.variant_lengths))
    result = {**about, "command": command, "rows": []}
    json_path = args.out / f"{device_slug()}-variants.json"
    for name in VARIANTS:  # the JSON is rewritten after each variant: a cut-off run keeps some
        result["rows"] += bench_variant(
            name, tuple(args.variant_lengths or ()), log=lambda r: print(json.dumps(r), flush=True)
        )
        atomic_write_text(json_path, json.dumps(result, indent=1))
    write_variant_docs(result, args.docs)
    print(_variant_table(result["rows"]))
    return 0


def _bench_main(args: argparse.Namespace, about: dict) -> None:
    """The main tables: every shape and length, the targets, the docs block."""
    command = "python -m kernels.bench"
    if tuple(args.lengths) != LENGTHS:
        command += " --lengths " + " ".join(map(str, args.lengths))
    shapes = tuple(s for s in SHAPES if args.kv_heads is None or s[0] in args.kv_heads)
    if args.kv_heads is not None:
        command += " --kv-heads " + " ".join(map(str, args.kv_heads))
    result = {
        **about,
        "command": command,
        "block_sizes": {
            f"d={d}": {
                "stats": stats_module.block_sizes(d, True),
                "stats+out": stats_module.block_sizes(d, True, with_output=True),
                "received": received_module.block_sizes(d, True),
            }
            for d in sorted({d for _, d in shapes})
        },
        "rows": [],
    }
    json_path = args.out / f"{device_slug()}.json"
    for n_kv, d in shapes:  # the JSON is rewritten after each shape: a cut-off run keeps some
        result["rows"] += bench_shape(
            n_kv, d, tuple(args.lengths), log=lambda r: print(json.dumps(r), flush=True)
        )
        result["targets"] = targets(result["rows"])
        atomic_write_text(json_path, json.dumps(result, indent=1))
    write_docs(result, args.docs)
    for n_kv, d in shapes:
        print(_table(result["rows"], n_kv, d), "\n")
    for t in result["targets"]:
        met = "not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
        print(f"target {t['target']}: {t['worst']:.3f} ({t['where']}) {met}")


if __name__ == "__main__":
    raise SystemExit(main())
