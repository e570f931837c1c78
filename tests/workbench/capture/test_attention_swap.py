"""The attention-function swap: what transformers hands an attention function, parsed once.

The local-structure reader is checked against transformers' own mask functions (the models'
source of truth), and every refusal is a `CaptureError` naming what to do instead.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.masking_utils import (
    causal_mask_function,
    chunked_causal_mask_function,
    sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function,
)

from workbench.capture import PATHS, PATTERN_PATH_MAX_TOKENS, resolve_path
from workbench.capture.attention import (
    KeyMask,
    attend,
    key_mask,
    parse_call,
    register,
    use_attention,
)
from workbench.errors import CaptureError


def _qkv(q_len=6, k_len=6, heads=4, kv_heads=2, d=8, d_v=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, heads, q_len, d, generator=g),
        torch.randn(1, kv_heads, k_len, d, generator=g),
        torch.randn(1, kv_heads, k_len, d_v, generator=g),
    )


class _Module(torch.nn.Module):
    is_causal = True
    layer_idx = 3


def test_resolve_path_by_length():
    assert resolve_path("auto", PATTERN_PATH_MAX_TOKENS) == "pattern"
    assert resolve_path("auto", PATTERN_PATH_MAX_TOKENS + 1) == "streamed"
    assert resolve_path("streamed", 10) == "streamed"
    assert resolve_path("pattern", 10**6) == "pattern"


@given(st.text(max_size=12).filter(lambda name: name not in PATHS))
def test_resolve_path_refuses_every_other_name(name):
    with pytest.raises(CaptureError, match="path must be one of auto, pattern, streamed"):
        resolve_path(name, 10)


@pytest.mark.parametrize(
    ("mask_function", "window", "chunk"),
    [
        (sliding_window_causal_mask_function(5), 5, None),  # Mistral, Gemma 2/3 local layers
        (sliding_window_bidirectional_mask_function(5), 6, None),  # ModernBERT: |p - j| <= 5
        (chunked_causal_mask_function(5, torch.zeros(2, dtype=torch.long)), None, 5),  # Llama 4
    ],
)
def test_key_mask_reads_the_local_structure(mask_function, window, chunk):
    mask = key_mask(2, 20, 20, mask_function=mask_function, local_size=5)
    assert mask == KeyMask(padding=None, window=window, chunk=chunk)
    # an input inside the window is plain attention: no structure to hand on
    assert key_mask(2, 5, 5, mask_function=mask_function, local_size=5) is None


@given(window=st.integers(1, 40), length=st.integers(1, 90))
def test_key_mask_window_matches_transformers_mask(window, length):
    """The window read off the mask function keeps exactly the keys transformers' mask keeps."""
    mask = key_mask(1, length, length, mask_function=sliding_window_causal_mask_function(window),
                    local_size=window)  # fmt: skip
    p, j = torch.arange(length)[:, None], torch.arange(length)[None]
    expected = sliding_window_causal_mask_function(window)(0, 0, p, j)
    seen = (j <= p) if mask is None else (j <= p) & (p - j < mask.window)
    assert torch.equal(seen, expected)


def test_key_mask_keeps_padding_and_refuses_custom_masks():
    pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    mask = key_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=pad)
    assert mask.window is None and mask.padding.tolist() == pad.bool().tolist()
    assert key_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=pad[1:]) is None
    with pytest.raises(CaptureError, match="custom attention mask"):
        key_mask(1, 4, 4, mask_function=causal_mask_function, use_vmap=True)
    with pytest.raises(CaptureError, match="custom attention mask function"):
        key_mask(1, 4, 4, mask_function=lambda b, h, q, k: k <= q)
    with pytest.raises(CaptureError, match="neither a sliding window nor chunks"):
        key_mask(1, 20, 20, mask_function=lambda b, h, q, k: (k <= q) & (k % 2 == 0), local_size=4)
    # left padding: chunks start at each row's first real token, as transformers' overlay says
    left_padded = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    chunked = chunked_causal_mask_function(3, torch.tensor([2, 0]))
    mask = key_mask(2, 10, 10, mask_function=chunked, attention_mask=left_padded, local_size=3)
    assert (mask.window, mask.chunk) == (None, 3) and mask.padding is not None
    misaligned = chunked_causal_mask_function(3, torch.tensor([0, 0]))
    with pytest.raises(CaptureError, match="neither a sliding window nor chunks"):
        key_mask(2, 10, 10, mask_function=misaligned, attention_mask=left_padded, local_size=3)


def test_parse_call_reads_the_variant_arguments():
    q, k, v = _qkv(d_v=5)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    call = parse_call(_Module(), q, k, v, KeyMask(window=4), 0.3, 0.0,
                      {"softcap": 30.0, "s_aux": sinks, "sliding_window": 4})  # fmt: skip
    assert (call.layer, call.causal, call.scale, call.window, call.softcap) == (3, True, 0.3, 4, 30)
    assert torch.equal(call.sinks, sinks) and not call.plain
    options = call.kernel_options()
    assert options.pop("sinks") is call.sinks
    assert options == dict(causal=True, scale=0.3, key_padding_mask=None, window=4, softcap=30.0)
    plain = parse_call(_Module(), q, k, v, None, None, 0.0, {"is_causal": False})
    assert plain.plain and not plain.causal and plain.scale == pytest.approx(8**-0.5)


def test_parse_call_refuses_what_the_kernels_cannot_reproduce():
    q, k, v = _qkv()
    with pytest.raises(CaptureError, match="position bias.*path='pattern'"):
        parse_call(_Module(), q, k, v, None, None, 0.0, {"position_bias": torch.zeros(1)})
    with pytest.raises(CaptureError, match="4D attention mask"):
        parse_call(_Module(), q, k, v, torch.zeros(1, 1, 6, 6), None, 0.0, {})
    with pytest.raises(CaptureError, match="sliding_window=3 but its mask function is plain"):
        parse_call(_Module(), q, k, v, None, None, 0.0, {"sliding_window": 3})
    with pytest.raises(CaptureError, match=r"learned sink logits must be \[n_heads=4\]"):
        parse_call(_Module(), q, k, v, None, None, 0.0, {"s_aux": torch.zeros(3)})
    padded = parse_call(_Module(), q, k, v, KeyMask(padding=torch.ones(1, 6, dtype=torch.bool)),
                        None, 0.1, {})  # fmt: skip
    with pytest.raises(CaptureError, match="dropout"):
        attend(padded)


def test_attend_equals_masked_softmax_for_plain_and_partial_prefill():
    for q_len in (6, 1, 3):  # full prefill, one decoding step, a partial prefill block
        q, k, v = _qkv(q_len=q_len, k_len=6, d_v=5)
        call = parse_call(_Module(), q, k, v, None, None, 0.0, {})
        scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5
        p, j = torch.arange(6 - q_len, 6)[:, None], torch.arange(6)[None]
        weights = scores.masked_fill(j > p, float("-inf")).softmax(-1)
        torch.testing.assert_close(attend(call), weights @ v.repeat_interleave(2, dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_hands_sdpa_grouped_kv_only_in_16_bit(dtype, monkeypatch):
    # fp32 SDPA with enable_gqa runs the math backend's [B, H, L, L] scores (out of memory at
    # 8K); 16-bit calls keep the grouped heads, which the flash backend reads directly
    q, k, v = (x.to(dtype) for x in _qkv(q_len=6, k_len=6, d_v=5))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, **kw):
        seen.append((key.shape[1], kw["enable_gqa"]))
        return sdpa(query, key, value, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = attend(parse_call(_Module(), q, k, v, None, None, 0.0, {}))
    assert seen == ([(4, False)] if dtype == torch.float32 else [(2, True)])
    want = sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, want)


def test_use_attention_switches_and_restores(tiny_model):
    seen = []

    def function(call):
        seen.append(call.layer)
        return attend(call)

    register("swap_test", function)
    assert "swap_test" in AttentionInterface._global_mapping
    hf = tiny_model.hf
    before = hf.config._attn_implementation
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        expected = hf(ids).logits
        with use_attention(hf, "swap_test"):
            got = hf(ids).logits
    assert seen == list(range(tiny_model.info.n_layers))
    assert hf.config._attn_implementation == before
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with (
        pytest.raises(TypeError, match="PreTrainedModel"),
        use_attention(torch.nn.Linear(2, 2), ""),
    ):
        pass
