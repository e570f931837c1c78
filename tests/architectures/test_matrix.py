"""The architecture matrix: every family of ``families.py`` through every path of the workbench.

Per family (test ids are the family names), on a prompt of ``SEQ_LEN`` tokens, several times
longer than the family's sliding window or chunk:

* ``test_streamed_statistics``: the streamed statistics (:class:`StreamedRecorder`) equal those
  of the model's own eager attention patterns (``output_attentions=True``, independent of the
  workbench) reduced by :func:`kernels.stats_from_pattern`, fp32, within 1e-4;
* ``test_streamed_logits``: the logits under the streamed attention function equal the eager ones;
* ``test_pattern_statistics``: the pattern path's per-head statistics (TransformerLens hooks)
  equal those computed here from the eager patterns by their documented definitions;
* ``test_scan_pattern`` / ``test_scan_streamed``: :func:`workbench.scanner.scan` with the default
  probes runs on each path, and the two paths give the same score tables;
* ``test_zero_ablation_pattern`` / ``test_zero_ablation_streamed``: a zero ablation of two heads
  (:func:`interventions.intervene`) gives the logits of the same heads zeroed at the model's own
  output projection, :func:`interventions.evaluate` runs with it on each path, and the two paths
  give the same per-example losses;
* ``test_kv_policy``: the KV-cache policy simulation reproduces the eager logits when every KV
  head keeps its cache, and an independent reference (the family's own eager attention with the
  policy's evictions added to its mask) under a mixed policy;
* ``test_transformer_lens_bridge``: TransformerLens's ``TransformerBridge.boot_transformers``
  boots on the in-memory model and gives its logits and patterns;
* ``test_model_info``: :func:`workbench.models.from_hf` reads the family's shape right.

Where the workbench cannot support a family on a path (``Family.refuses``), the test asserts
the one-line :class:`~workbench.errors.CaptureError` instead. ``python -m
tests.architectures.matrix`` runs this module and writes docs/architectures.md from the results.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np
import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from interventions import Loss, ZeroAblation, evaluate, intervene
from kernels import AttentionStats, stats_from_pattern
from tests.architectures.families import (
    BY_NAME,
    FAMILIES,
    SEQ_LEN,
    Family,
    build,
    prompt_ids,
    prompt_texts,
    tokenizer,
)
from workbench.capture import StreamedRecorder, head_statistics
from workbench.errors import CaptureError
from workbench.kv_policy import CachePolicy
from workbench.models import Model, from_hf
from workbench.scanner import ScanResult, scan
from workbench.tasks import PromptSet

ATOL = 1e-4
# Statistics options for the streamed-vs-eager comparison: two sink keys, a recent window and two
# spans that straddle several of the families' 8-token windows.
OPTIONS: dict[str, Any] = dict(sink_size=2, recent_window=12, spans=[[10, 14], [30, 40]])
FIELDS = ("entropy", "max_prob", "sink_mass", "span_mass", "outside_mass")
IDS = prompt_ids()  # [1, SEQ_LEN]
PROMPTS = PromptSet("matrix", tuple(prompt_texts(2, seed=1)))
LOSS = Loss(n=2, length=SEQ_LEN, text=prompt_texts(1, seq_len=4 * SEQ_LEN, seed=2)[0])
ABLATED = [(0, 1), (1, 2)]  # (layer, head)

parametrize = pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])


# ---------------------------------------------------------------------------------------------
# The models and their eager reference, built once per family


@functools.cache
def workbench_model(name: str) -> Model:
    """The family's model as a workbench :class:`Model` (scans and interventions share it)."""
    return from_hf(build(BY_NAME[name]), tokenizer(), name=f"matrix-{name}")


@functools.cache
def eager(name: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Logits ``[1, seq, vocab]`` and per-layer patterns ``[1, head, q_pos, k_pos]`` of the
    family's eager attention, from its own model object (no workbench code involved)."""
    with torch.no_grad():
        out = build(BY_NAME[name])(IDS, output_attentions=True)
    return out.logits, out.attentions


def eager_statistics(family: Family, pattern: torch.Tensor) -> AttentionStats:
    """The statistics (:data:`OPTIONS`) of one eager pattern ``[1, head, q_pos, k_pos]``; with
    learned sinks the mass a row lacks is the sink's."""
    options = {**OPTIONS, "learned_sinks": True} if family.learned_sinks else OPTIONS
    return stats_from_pattern(pattern.float(), causal=family.causal, **options)


def streamed(model: Model) -> tuple[StreamedRecorder, torch.Tensor]:
    """One forward under the streamed recorder: the recorder and the logits."""
    with torch.no_grad(), StreamedRecorder(model.hf, **OPTIONS) as recorder:
        logits = model.hf(IDS).logits
    return recorder, logits


def assert_refused(run: Callable[[], Any]) -> None:
    """``run`` raises a :class:`CaptureError` whose message is one line."""
    with pytest.raises(CaptureError) as caught:
        run()
    message = str(caught.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"


def assert_same_statistics(got: AttentionStats, want: AttentionStats, pattern: torch.Tensor,
                           where: str) -> None:  # fmt: skip
    """Every statistic within ATOL; the argmax identical except between tied probabilities."""
    fields = FIELDS if want.learned_sink_mass is None else (*FIELDS, "learned_sink_mass")
    for name in fields:
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name).float(), atol=ATOL, rtol=0,
            msg=lambda m, name=name: f"{where} {name}: {m}",
        )  # fmt: skip
    differ = got.argmax != want.argmax
    if differ.any():  # the probabilities at the two argmaxes must then be equal
        at_got = pattern.gather(-1, got.argmax.clamp(min=0)[..., None])[..., 0][differ]
        at_want = pattern.gather(-1, want.argmax.clamp(min=0)[..., None])[..., 0][differ]
        torch.testing.assert_close(at_got, at_want, atol=1e-6, rtol=0, msg=f"{where} argmax")


# ---------------------------------------------------------------------------------------------
# (a), (b): the streamed path against the model's own eager attention


@parametrize
def test_streamed_statistics(family: Family) -> None:
    model = workbench_model(family.name)
    if "streamed" in family.refuses:
        assert_refused(lambda: streamed(model))
        return
    recorder, _ = streamed(model)
    _, patterns = eager(family.name)
    assert len(recorder.stats) == len(patterns)
    for layer, (stats, pattern) in enumerate(zip(recorder.stats, patterns, strict=True)):
        want = eager_statistics(family, pattern)
        assert_same_statistics(stats, want, pattern.float(), f"layer {layer}")


@parametrize
def test_streamed_logits(family: Family) -> None:
    model = workbench_model(family.name)
    if "streamed" in family.refuses:
        assert_refused(lambda: streamed(model))
        return
    _, logits = streamed(model)
    torch.testing.assert_close(logits, eager(family.name)[0], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# The pattern path against the eager attention


def expected_head_statistics(family: Family) -> dict[str, np.ndarray]:
    """The per-head prompt statistics of :data:`workbench.capture.STATISTICS`, computed here from
    the eager patterns by their documented definitions: ``{name: [n_layers, n_heads]}``. A key is
    visible to a query when its probability is positive in some head of the layer."""
    rows: dict[str, list[torch.Tensor]] = {}
    for pattern in eager(family.name)[1]:
        a = pattern[0].double()  # [head, q_pos, k_pos]
        seen = (a > 0).any(0)  # [q_pos, k_pos]
        visible = seen.sum(-1)  # [q_pos]
        entropy = -torch.where(a > 0, a * a.log(), 0.0).sum(-1)  # [head, q_pos]
        learned = torch.zeros_like(entropy)
        if family.learned_sinks:  # the sink's probability is what the row lacks
            learned = (1 - a.sum(-1)).clamp(min=0)
            entropy -= torch.where(learned > 0, learned * learned.log(), 0.0)
        informative = visible > 1
        values = {
            "first_token_mass": a[:, seen[:, 0], 0].mean(-1),
            "entropy": entropy.mean(-1),
            "normalized_entropy": (entropy[:, informative] / visible[informative].log()).mean(-1),
            "max_prob": a.max(-1).values.mean(-1),
            "learned_sink_mass": learned.mean(-1),
        }
        for name, value in values.items():
            rows.setdefault(name, []).append(value)
    return {name: torch.stack(value).float().numpy() for name, value in rows.items()}


@parametrize
def test_pattern_statistics(family: Family) -> None:
    """The pattern path's per-head statistics (``head_statistics(path="pattern")``) equal those
    computed here from the eager patterns."""
    model = workbench_model(family.name)
    if "pattern" in family.refuses:
        assert_refused(lambda: head_statistics(model, IDS[0], path="pattern"))
        return
    got = head_statistics(model, IDS[0], path="pattern")  # {statistic: [n_layers, n_heads]}
    for name, want in expected_head_statistics(family).items():
        assert name in got, f"head_statistics gives no {name!r}"
        np.testing.assert_allclose(got[name], want, atol=ATOL, rtol=0, err_msg=name)


# ---------------------------------------------------------------------------------------------
# (c): scan and interventions on both paths


@functools.cache
def scanned(name: str, path: str) -> ScanResult:
    return scan(workbench_model(name), PROMPTS, path=path, progress=False)


def check_scan(family: Family, path: str) -> ScanResult | None:
    """The scan on ``path`` (None where the family refuses the path, asserting the refusal)."""
    if path in family.refuses:
        assert_refused(lambda: scanned(family.name, path))
        return None
    result = scanned(family.name, path)
    info = workbench_model(family.name).info
    for table in result.tables.values():
        assert table.values.shape == (info.n_layers, info.n_heads)
        assert np.isfinite(table.values).all(), table.name
    return result


@parametrize
def test_scan_pattern(family: Family) -> None:
    check_scan(family, "pattern")


@parametrize
def test_scan_streamed(family: Family) -> None:
    """The streamed scan runs and, where the pattern path runs too, gives its score tables."""
    result = check_scan(family, "streamed")
    if result is None or "pattern" in family.refuses:
        return
    reference = scanned(family.name, "pattern")
    assert result.tables.keys() == reference.tables.keys()
    for name, table in result.tables.items():
        np.testing.assert_allclose(
            table.values, reference.tables[name].values, atol=ATOL, rtol=0, err_msg=name
        )


@functools.cache
def ablated_reference(name: str) -> torch.Tensor:
    """Logits ``[1, seq, vocab]`` with the :data:`ABLATED` heads' outputs zeroed where the model
    itself concatenates them: the input slice ``[h * d_v, (h + 1) * d_v)`` of each layer's output
    projection (``Family.head_output``), by a forward pre-hook (no workbench code involved)."""
    family = BY_NAME[name]
    hf = build(family)
    n_heads = workbench_model(name).info.n_heads
    handles = []
    for layer, head in ABLATED:
        suffix = re.compile(rf"\.{layer}\.{re.escape(family.head_output)}$")
        (module,) = [m for n, m in hf.named_modules() if suffix.search(n)]

        def zero_head(module: torch.nn.Module, args: tuple, head: int = head) -> tuple:
            heads = args[0].clone()  # [batch, seq, n_heads * d_v]
            d_v = heads.shape[-1] // n_heads
            heads[..., head * d_v : (head + 1) * d_v] = 0
            return (heads, *args[1:])

        handles.append(module.register_forward_pre_hook(zero_head))
    try:
        with torch.no_grad():
            return hf(IDS).logits
    finally:
        for handle in handles:
            handle.remove()


@functools.cache
def ablated(name: str, path: str) -> dict[str, dict[str, np.ndarray]]:
    """``evaluate``'s per-example losses with the :data:`ABLATED` heads zeroed on ``path``."""
    result = evaluate(
        workbench_model(name), LOSS, ZeroAblation(heads=ABLATED), path=path, n_controls=1,
        n_bootstrap=20, batch_size=2,
    )  # fmt: skip
    return result.per_example


def check_ablation(family: Family, path: str) -> dict[str, dict[str, np.ndarray]] | None:
    """On ``path``: ``intervene`` gives the reference ablation's logits and ``evaluate`` runs
    (None where the family refuses the path, asserting the refusal)."""
    model = workbench_model(family.name)
    spec = ZeroAblation(heads=ABLATED)
    if path in family.refuses or (path == "pattern" and "pattern_output" in family.refuses):
        assert_refused(lambda: intervene(model, IDS, spec, path=path))
        return None
    logits = intervene(model, IDS, spec, path=path)
    torch.testing.assert_close(logits, ablated_reference(family.name), atol=ATOL, rtol=0)
    per_example = ablated(family.name, path)
    base, hit = per_example["baseline"]["loss"], per_example["intervened"]["loss"]
    assert base.shape == hit.shape == (LOSS.n,)
    assert np.isfinite(base).all() and np.isfinite(hit).all()
    assert np.abs(hit - base).max() > 1e-3, "zero-ablating two heads left the loss unchanged"
    return per_example


@parametrize
def test_zero_ablation_pattern(family: Family) -> None:
    check_ablation(family, "pattern")


@parametrize
def test_zero_ablation_streamed(family: Family) -> None:
    """As on the pattern path, and where the pattern path runs too, ``evaluate`` gives its
    per-example losses (clean, ablated and matched control)."""
    per_example = check_ablation(family, "streamed")
    if per_example is None or {"pattern", "pattern_output"} & set(family.refuses):
        return
    reference = ablated(family.name, "pattern")
    for group, metrics in per_example.items():
        np.testing.assert_allclose(
            metrics["loss"], reference[group]["loss"], atol=ATOL, rtol=0, err_msg=group
        )


# ---------------------------------------------------------------------------------------------
# The KV-cache policy simulation

SINK, RECENT = 2, 6  # RECENT < the families' windows: streaming heads lose keys on every layer
REFERENCE = "matrix_policy_reference"
_POLICY: ContextVar[tuple[CachePolicy, int] | None] = ContextVar(REFERENCE, default=None)


def reference_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """The family's own ``eager_attention_forward`` with the active policy's evictions added to
    its (materialised, additive) mask: query head h of a streaming KV head sees key j at
    position p only if j < SINK or j > p - RECENT, on top of the model's own mask."""
    policy, group = _POLICY.get()
    q_len, k_len = query.shape[2], key.shape[2]
    position = torch.arange(k_len - q_len, k_len)[:, None]  # [q_pos, 1]
    keys = torch.arange(k_len)[None, :]  # [1, k_pos]
    kept = (keys < policy.sink_size) | (keys > position - policy.recent_size)  # [q_pos, k_pos]
    full = torch.as_tensor(policy.kv_full[module.layer_idx]).repeat_interleave(group)  # [head]
    evicted = ~full[:, None, None] & ~kept  # [head, q_pos, k_pos]
    bias = torch.zeros(evicted.shape).masked_fill(evicted, float("-inf"))[None]
    mask = bias if attention_mask is None else attention_mask + bias
    own_eager = sys.modules[type(module).__module__].eager_attention_forward
    return own_eager(module, query, key, value, mask, **kwargs)


def policy_logits(model: Model, policy: CachePolicy) -> torch.Tensor:
    with torch.no_grad(), policy.applied(model.hf):
        return model.hf(IDS).logits


@parametrize
def test_kv_policy(family: Family) -> None:
    model = workbench_model(family.name)
    info = model.info
    shape = (info.n_layers, info.n_kv_heads)
    all_full = CachePolicy(np.ones(shape, bool), sink_size=SINK, recent_size=RECENT)
    if "kv_policy" in family.refuses or "streamed" in family.refuses:
        assert_refused(lambda: policy_logits(model, all_full))
        return
    torch.testing.assert_close(policy_logits(model, all_full), eager(family.name)[0],
                               atol=ATOL, rtol=0)  # fmt: skip
    layers, kv_heads = np.indices(shape)
    mixed = CachePolicy((layers + kv_heads) % 2 == 0, sink_size=SINK, recent_size=RECENT)
    got = policy_logits(model, mixed)

    AttentionInterface.register(REFERENCE, reference_attention)
    AttentionMaskInterface.register(REFERENCE, eager_mask)
    reference = build(family, attn_implementation=REFERENCE)
    token = _POLICY.set((mixed, info.group_size))
    try:
        with torch.no_grad():
            want = reference(IDS).logits
    finally:
        _POLICY.reset(token)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - eager(family.name)[0]).abs().max() > 1e-3, "the mixed policy evicted nothing"


# ---------------------------------------------------------------------------------------------
# (d): TransformerLens


@parametrize
def test_transformer_lens_bridge(family: Family) -> None:
    """The bridge boots offline on the in-memory model (its own copy: the bridge replaces the
    attention modules in place) and gives the eager logits and patterns. Where TransformerLens
    has no adapter, it refuses, so that the day it gains one this test says so."""
    hf = build(family)

    def boot() -> Any:
        return TransformerBridge.boot_transformers(
            f"matrix-{family.name}", hf_model=hf, tokenizer=tokenizer()
        )

    if not family.tl_bridge:
        with pytest.raises(ValueError, match="supported architecture"):
            boot()
        return
    bridge = boot()
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(IDS)
    eager_logits, patterns = eager(family.name)
    torch.testing.assert_close(logits, eager_logits, atol=ATOL, rtol=0)
    for layer, pattern in enumerate(patterns):
        torch.testing.assert_close(
            cache[f"blocks.{layer}.attn.hook_pattern"], pattern, atol=ATOL, rtol=0,
            msg=lambda m, layer=layer: f"layer {layer}: {m}",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The model's metadata


@parametrize
def test_model_info(family: Family) -> None:
    hf = build(family)
    info = from_hf(hf, tokenizer(), name=family.name).info
    _, patterns = eager(family.name)
    text = hf.config.get_text_config()
    n_kv = getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None)
    if getattr(text, "multi_query", False):  # Falcon's flag for one KV head
        n_kv = 1
    assert (info.architecture, info.n_layers, info.n_heads) == (
        family.model_class,
        len(patterns),
        patterns[0].shape[1],
    )
    assert info.n_kv_heads == (n_kv or info.n_heads)
    assert info.causal == family.causal
