"""Decode steps through the streamed recorder: one query against a KV cache of every earlier key.

While a model generates, each forward pass hands the attention function ``q_len = 1`` query rows
against ``k_len`` = the cache length, the query being the last key position. These tests run a
tiny Llama through a ``DynamicCache`` prefill and then decode steps twice on separate caches, once
with eager attention (``output_attentions=True`` gives each step's probabilities ``[batch, heads,
1, k_len]``) and once under the recorder, and compare the recorded statistics with the ones
reduced here, by hand, from the eager probabilities.
"""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from workbench.capture.attention import KeyMask, key_mask
from workbench.capture.streamed import StreamedRecorder
from workbench.errors import CaptureError

SINK, RECENT, SPANS = 2, 3, [[2, 5], [7, 12]]
PREFILL, STEPS = 10, 2
ATOL = 1e-5


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    return model


def _triton_or_skip(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
        from kernels.attention_stats import interpreting

        if not interpreting():
            pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")


def _decode(model, ids, mask, recorder=None):
    """Prefill ``PREFILL`` tokens into a fresh cache, then feed the next ``STEPS`` tokens one at a
    time (teacher-forced, so both runs see the same tokens). Returns each step's logits and, when
    no recorder is given, its eager attention probabilities (per layer ``[batch, heads, 1, k]``)."""
    cache = DynamicCache()
    logits, patterns = [], []
    with torch.no_grad():
        model(ids[:, :PREFILL], attention_mask=mask[:, :PREFILL], past_key_values=cache)
        with recorder or contextlib.nullcontext():
            for t in range(PREFILL, PREFILL + STEPS):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                            past_key_values=cache, output_attentions=recorder is None)  # fmt: skip
                logits.append(out.logits)
                patterns.append(out.attentions)
    return logits, patterns


def _statistics_by_hand(pattern: torch.Tensor) -> dict[str, torch.Tensor]:
    """The recorder's statistics of one decode step, straight from its probabilities.

    ``pattern [batch, heads, 1, k_len]``; the query sits at position ``k_len - 1`` and key indices
    are absolute cache positions (left padding included, where eager puts probability 0).
    """
    p = pattern[:, :, 0].double()  # [batch, heads, k_len]
    position = p.shape[-1] - 1
    outside_end = max(SINK, position - RECENT + 1)  # outside: keys SINK <= j <= position - RECENT
    max_prob, _ = p.max(-1)
    return {
        "entropy": -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1),
        "max_prob": max_prob,
        "sink_mass": p[..., :SINK].sum(-1),
        "span_mass": torch.stack([p[..., s:e].sum(-1) for s, e in SPANS], -1),
        "outside_mass": p[..., SINK:outside_end].sum(-1),
    }


@pytest.mark.parametrize(
    ("backend", "output", "padded"),
    [
        ("torch", "kernel", False),
        ("torch", "sdpa", False),
        ("torch", "kernel", True),
        ("torch", "sdpa", True),  # padding: the output comes from the fused pass anyway
        # Triton's interpreter costs ~1 s a launch: the fused pass under padding, and the
        # statistics-only pass next to SDPA's output
        ("triton", "kernel", True),
        ("triton", "sdpa", False),
    ],
)
def test_decode_steps_match_eager_patterns(llama, backend, output, padded):
    _triton_or_skip(backend)
    ids = torch.randint(0, 64, (2, PREFILL + STEPS), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # left padding, as in batched generation
    want_logits, patterns = _decode(llama, ids, mask)
    recorder = StreamedRecorder(
        llama, sink_size=SINK, recent_window=RECENT, spans=SPANS, received=True,
        backend=backend, output=output,
    )  # fmt: skip
    logits, _ = _decode(llama, ids, mask, recorder)

    assert len(recorder.forwards) == STEPS
    for step in range(STEPS):
        torch.testing.assert_close(logits[step], want_logits[step], atol=1e-4, rtol=0)
        k_len = PREFILL + step + 1
        for layer, pattern in enumerate(patterns[step]):
            assert pattern.shape == (2, 4, 1, k_len)
            got = recorder.forwards[step][layer]
            assert got.entropy.shape == (2, 4, 1)
            for name, want in _statistics_by_hand(pattern).items():
                torch.testing.assert_close(
                    getattr(got, name)[:, :, 0].double(), want, atol=ATOL, rtol=0, msg=name
                )
            # the key of largest probability (ties are measure-zero with random weights)
            assert torch.equal(got.argmax[:, :, 0], pattern[:, :, 0].argmax(-1))
            if padded:  # the padding keys are never the argmax, and receive nothing
                assert (got.argmax[0] >= 3).all()
            # received attention of one query is its own probability row
    torch.testing.assert_close(recorder.received[-1], patterns[-1][-1][:, :, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("output", ["auto", "kernel"])
def test_decode_steps_keep_only_the_asked_positions(llama, output):
    """``q_positions`` are absolute: a decode step records its one query only when its position
    (the cache length before the step) is listed, and then exactly what recording every query
    gives."""
    ids = torch.randint(0, 64, (1, PREFILL + STEPS), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    kw = dict(sink_size=SINK, recent_window=RECENT, spans=SPANS, output=output)
    every = StreamedRecorder(llama, **kw)
    _decode(llama, ids, mask, every)
    kept_position = PREFILL + 1  # the second decode step's query
    some = StreamedRecorder(llama, q_positions=[3, kept_position], **kw)
    _decode(llama, ids, mask, some)

    for step, (all_layers, kept_layers) in enumerate(
        zip(every.forwards, some.forwards, strict=True)
    ):
        for whole, kept in zip(all_layers, kept_layers, strict=True):
            if PREFILL + step == kept_position:
                assert kept.entropy.shape == (1, 4, 1)
                for name in ("entropy", "max_prob", "sink_mass", "span_mass", "outside_mass"):
                    torch.testing.assert_close(getattr(kept, name), getattr(whole, name))
                assert torch.equal(kept.argmax, whole.argmax)
            else:  # position 3 was a prefill query: no decode step has it
                assert kept.entropy.shape == (1, 4, 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliding_window_cache_keeps_absolute_positions(backend):
    """Mistral's own generation cache keeps only a local layer's last ``window - 1`` keys, so a
    decode step hands over keys from position ``kv_offset`` on. Sinks, spans, argmax,
    ``q_positions`` and received attention still refer to absolute positions: the statistics
    equal those of the same rows of one full eager forward pass."""
    _triton_or_skip(backend)
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=5,
    )  # fmt: skip
    torch.manual_seed(0)
    mistral = MistralForCausalLM(config).eval()
    mistral.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (1, PREFILL + STEPS), generator=torch.Generator().manual_seed(7))
    kept_position = PREFILL + 1
    kw = dict(sink_size=SINK, recent_window=RECENT, spans=SPANS, backend=backend)
    every = StreamedRecorder(mistral, received=True, **kw)
    some = StreamedRecorder(mistral, q_positions=[kept_position], **kw)
    with torch.no_grad():
        eager = mistral(ids, output_attentions=True)
        for recorder in (every, some):
            cache = DynamicCache(config=config)  # what generate() builds: sliding-window layers
            mistral(ids[:, :PREFILL], past_key_values=cache)
            with recorder:
                for t in range(PREFILL, PREFILL + STEPS):
                    mistral(ids[:, t : t + 1], past_key_values=cache)
    assert cache.layers[0].keys.shape[2] == config.sliding_window - 1  # keys were dropped

    for step in range(STEPS):
        t = PREFILL + step
        for layer, pattern in enumerate(eager.attentions):
            row = pattern[:, :, t : t + 1, : t + 1]  # [1, heads, 1, t + 1], zeros off-window
            got = every.forwards[step][layer]
            for name, want in _statistics_by_hand(row).items():
                torch.testing.assert_close(
                    getattr(got, name)[:, :, 0].double(), want, atol=ATOL, rtol=0, msg=name
                )
            assert torch.equal(got.argmax[:, :, 0], row[:, :, 0].argmax(-1))
            kept = some.forwards[step][layer]
            assert kept.entropy.shape == (1, 4, int(t == kept_position))
            if t == kept_position:
                torch.testing.assert_close(kept.entropy, got.entropy)
                assert torch.equal(kept.argmax, got.argmax)
    last = PREFILL + STEPS - 1
    for received, pattern in zip(every.received, eager.attentions, strict=True):
        torch.testing.assert_close(received, pattern[:, :, last, : last + 1], atol=ATOL, rtol=0)


def test_key_mask_hands_on_where_a_sliding_window_cache_starts():
    """A decode step at position 12 of a layer whose cache kept keys 8..12 (window 5)."""
    from transformers.masking_utils import (
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
    )

    sizes = dict(batch_size=1, q_length=1, kv_length=5, q_offset=12, kv_offset=8, local_size=5)
    window = sliding_window_causal_mask_function(5)
    assert key_mask(mask_function=window, **sizes) == KeyMask(window=5, offset=8)
    # chunk boundaries among the kept keys are unknown: refused, not guessed
    chunks = chunked_causal_mask_function(5, torch.zeros(1, dtype=torch.long))
    with pytest.raises(CaptureError, match="DynamicCache"):
        key_mask(mask_function=chunks, **sizes)
