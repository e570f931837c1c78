"""The streamed capture path against materialised patterns (TransformerLens and HF eager)."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import stats_from_pattern
from workbench.capture.streamed import ATTENTION_NAME, StreamedRecorder, _already_on

ATOL = 1e-4
KW = dict(sink_size=2, recent_window=3, spans=[[2, 5], [7, 12]])
FIELDS = ("entropy", "max_prob", "sink_mass", "span_mass", "outside_mass")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(62)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, name_or_path="tiny-llama", add_bos_token=True, unk_token="<unk>",
        bos_token="<s>", pad_token="<unk>",
    )  # fmt: skip


def _llama(cls_name="LlamaForCausalLM", **extra):
    import transformers

    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def llama():
    return _llama()


def assert_agree(streamed, pattern_stats, pattern):
    """Every statistic within ATOL; argmax identical except between tied probabilities."""
    for name in FIELDS:
        got, want = getattr(streamed, name), getattr(pattern_stats, name)
        torch.testing.assert_close(got, want.float(), atol=ATOL, rtol=0, msg=name)
    differ = streamed.argmax != pattern_stats.argmax
    if differ.any():
        at = pattern.gather(-1, streamed.argmax.clamp(min=0)[..., None])[..., 0][differ]
        best = pattern.gather(-1, pattern_stats.argmax.clamp(min=0)[..., None])[..., 0][differ]
        torch.testing.assert_close(at, best, atol=1e-6, rtol=0)


def test_agrees_with_transformer_lens_hook_pattern(llama):
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge replaces the HF attention modules in place with its own eager reimplementation,
    # so it gets its own copy of the model.
    twin = copy.deepcopy(llama)
    bridge = TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=twin, tokenizer=_tokenizer()
    )
    ids = torch.randint(2, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with StreamedRecorder(llama, received=True, **KW) as rec:
            logits = llama(ids).logits
        assert llama.config._attn_implementation == "eager"  # restored
        tl_logits, cache = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits, tl_logits, atol=ATOL, rtol=0)
    assert len(rec.stats) == 2
    for layer, streamed in enumerate(rec.stats):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q_pos, k_pos]
        assert pattern.shape == (2, 4, 24, 24)
        assert streamed.lse.device.type == "cpu" and streamed.entropy.shape == (2, 4, 24)
        assert_agree(streamed, stats_from_pattern(pattern, **KW), pattern)
        torch.testing.assert_close(rec.received[layer], pattern.sum(2), atol=ATOL, rtol=0)


def _eager_patterns(model, ids, mask):
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    return out.logits, out.attentions


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_agrees_with_eager(llama, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from kernels.attention_stats import interpreting

        if not interpreting():
            pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 13:] = 0  # right padding
    want_logits, patterns = _eager_patterns(llama, ids, mask)
    with torch.no_grad(), StreamedRecorder(llama, backend=backend, **KW) as rec:
        logits = llama(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], want_logits[real], atol=ATOL, rtol=0)
    for streamed, pattern in zip(rec.stats, patterns, strict=True):
        want = stats_from_pattern(pattern, key_padding_mask=real, causal=True, **KW)
        assert_agree(streamed, want, pattern)
        assert (streamed.argmax[0, :, :5] == -1).all()  # left-padding queries see nothing


def test_bidirectional_encoder_agrees_with_eager():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    bert = BertModel(config).eval()
    bert.set_attn_implementation("eager")
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        out = bert(ids, attention_mask=mask, output_attentions=True)
        with StreamedRecorder(bert, received=True, **KW) as rec:
            hidden = bert(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden[real], out.last_hidden_state[real], atol=ATOL, rtol=0)
    for layer, pattern in enumerate(out.attentions):
        want = stats_from_pattern(pattern, key_padding_mask=real, **KW)
        assert_agree(rec.stats[layer], want, pattern)
        torch.testing.assert_close(
            rec.received[layer], (pattern * real[:, None, None, :]).sum(2), atol=ATOL, rtol=0
        )


def test_query_subset_and_mean(llama):
    ids = torch.randint(2, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    qmask = torch.zeros(2, 20, dtype=torch.bool)
    qmask[0, 15:] = True
    qmask[1, 10:12] = True
    with torch.no_grad():
        with StreamedRecorder(llama, **KW) as full:
            llama(ids)
        with StreamedRecorder(llama, q_positions=[3, 15, 19], **KW) as sub:
            llama(ids)
        with StreamedRecorder(llama, query_mask=qmask, reduce="mean", received=True, **KW) as red:
            llama(ids)
    for a, b, c, r in zip(full.stats, sub.stats, red.stats, red.received, strict=True):
        for name in FIELDS:
            whole = getattr(a, name)
            torch.testing.assert_close(getattr(b, name), whole[:, :, [3, 15, 19]])
            w = qmask[:, None, :].float()
            if whole.ndim == 4:
                mean = (whole * w[..., None]).sum(2) / w.sum(-1)[..., None]
            else:
                mean = (whole * w).sum(-1) / w.sum(-1)
            torch.testing.assert_close(getattr(c, name), mean)
        assert c.argmax is None and c.entropy.shape == (2, 4)
        assert r.shape == (2, 4, 20)
        torch.testing.assert_close(r.sum(-1), qmask.sum(-1, keepdim=True).float().expand(2, 4))


def test_generation_with_kv_cache(llama):
    ids = torch.randint(2, 64, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with StreamedRecorder(llama, **KW) as rec:
            seq = llama.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with StreamedRecorder(llama, **KW) as full:
            llama(seq[:, :-1])
    assert len(rec.forwards) == 3 and rec.stats[0].entropy.shape == (1, 4, 1)
    for step, whole in zip(rec.stats, full.stats, strict=True):  # last decode step = last row
        for name in FIELDS:
            torch.testing.assert_close(getattr(step, name), getattr(whole, name)[:, :, -1:])


def test_sliding_window_longer_than_the_input_equals_eager():
    """A Mistral local layer at 10 tokens with window 6: the kernels see exactly eager's keys."""
    mistral = _llama("MistralForCausalLM", sliding_window=6)
    ids = torch.randint(2, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = mistral(ids, output_attentions=True)
        with StreamedRecorder(mistral, **KW) as rec:
            streamed = mistral(ids)
    torch.testing.assert_close(streamed.logits, eager.logits, atol=1e-5, rtol=1e-5)
    for layer, pattern in enumerate(eager.attentions):  # [batch, head, q, k]
        assert pattern[0, 0, 9, :4].abs().max() == 0  # keys beyond the window are unseen
        assert_agree(rec.stats[layer], stats_from_pattern(pattern, **KW), pattern)
    assert mistral.config._attn_implementation == "eager"
    assert mistral.config._attn_implementation != ATTENTION_NAME


def test_bridged_model_is_refused(llama):
    from transformer_lens.model_bridge import TransformerBridge

    twin = copy.deepcopy(llama)
    TransformerBridge.boot_transformers("tiny-llama", hf_model=twin, tokenizer=_tokenizer())
    with torch.no_grad(), StreamedRecorder(twin) as rec:
        twin(torch.tensor([[1, 2, 3]]))
    with pytest.raises(RuntimeError, match="did not call the streamed attention"):
        _ = rec.stats


def _agree_with_bridge(model, text: str, n_tokens: int) -> None:
    """Every per-query statistic and the received attention of ``model`` (a built-in
    `workbench.models.Model`) from the streamed path against TransformerLens ``hook_pattern``."""
    ids = model.tokenize(text)[:n_tokens]
    kw = dict(sink_size=2, recent_window=4, spans=[[5, 12], [20, 30]])
    with torch.no_grad():
        _, cache = model.bridge().run_with_cache(ids[None])
        with StreamedRecorder(model.hf, received=True, **kw) as rec:
            model.hf(ids[None])
    assert len(rec.stats) == model.info.n_layers
    for layer, streamed in enumerate(rec.stats):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float()  # [batch, head, q, k]
        assert pattern.shape == (1, model.info.n_heads, len(ids), len(ids))
        want = stats_from_pattern(pattern, causal=model.info.causal, **kw)
        assert_agree(streamed, want, pattern)
        torch.testing.assert_close(rec.received[layer], pattern.sum(2), atol=ATOL, rtol=0)


TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 4


def test_minilm_agrees_with_transformer_lens():
    from workbench.models import load

    _agree_with_bridge(load("minilm", device="cpu"), TEXT, 48)  # bidirectional encoder


@pytest.mark.slow
def test_smollm2_agrees_with_transformer_lens(smollm2):
    _agree_with_bridge(smollm2, TEXT, 64)  # GQA: 9 query heads on 3 KV heads


def _arch(name: str):
    import transformers

    torch.manual_seed(0)
    if name == "GPT2":
        config = transformers.GPT2Config(
            vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
            eos_token_id=1,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config).eval()
    config = getattr(transformers, f"{name}Config")(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


@pytest.mark.parametrize("name", ["Qwen2", "Gemma", "GPT2"])
def test_other_architectures_agree_with_eager(name):
    model = _arch(name)
    model.set_attn_implementation("eager")
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    want_logits, patterns = _eager_patterns(model, ids, mask)
    with torch.no_grad(), StreamedRecorder(model, **KW) as rec:
        logits = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], want_logits[real], atol=ATOL, rtol=0)
    assert len(rec.stats) == 2
    for streamed, pattern in zip(rec.stats, patterns, strict=True):
        want = stats_from_pattern(pattern, key_padding_mask=real, causal=True, **KW)
        assert_agree(streamed, want, pattern)


def test_on_layer_streams_instead_of_keeping(llama):
    ids = torch.randint(2, 64, (2, 20), generator=torch.Generator().manual_seed(6))
    seen = []
    with torch.no_grad():
        with StreamedRecorder(llama, received=True, **KW) as kept:
            llama(ids)
        with StreamedRecorder(
            llama, received=True, on_layer=lambda *a: seen.append(a), **KW
        ) as rec:
            llama(ids)
    assert [layer for layer, _, _ in seen] == [0, 1]
    for (_, stats, received), want, want_received in zip(
        seen, kept.stats, kept.received, strict=True
    ):
        for name in (*FIELDS, "lse", "argmax"):
            torch.testing.assert_close(getattr(stats, name), getattr(want, name), atol=0, rtol=0)
        torch.testing.assert_close(received, want_received, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="on_layer"):
        _ = rec.stats


@pytest.mark.parametrize("output", ["kernel", "sdpa"])
def test_output_from_fused_kernel_or_sdpa(llama, output):
    pytest.importorskip("triton")
    from kernels.attention_stats import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(6))
    want_logits, patterns = _eager_patterns(llama, ids, None)
    with torch.no_grad():
        with StreamedRecorder(llama, backend="triton", output=output, **KW) as rec:
            logits = llama(ids).logits
        with StreamedRecorder(llama, backend="triton", output=output, q_positions=[3, 39]) as sub:
            sub_logits = llama(ids).logits
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(sub_logits, want_logits, atol=ATOL, rtol=0)
    for streamed, kept, pattern in zip(rec.stats, sub.stats, patterns, strict=True):
        assert streamed.output is None
        assert_agree(streamed, stats_from_pattern(pattern, **KW), pattern)
        torch.testing.assert_close(kept.entropy, streamed.entropy[:, :, [3, 39]], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="output"):
        StreamedRecorder(llama, output="eager")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    seq=st.integers(2, 24),
    padded=st.integers(0, 3),
    q_positions=st.none() | st.lists(st.integers(0, 23), min_size=1, max_size=3),
)
def test_on_attention_hands_over_values_and_output(llama, batch, seq, padded, q_positions):
    """``on_attention`` gets each layer's values as v_proj made them and the output o_proj reads
    next, whatever queries are kept; the recorded statistics are those of a recorder without it."""
    ids = torch.randint(2, 64, (batch, seq), generator=torch.Generator().manual_seed(seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : min(padded, seq - 1)] = 0  # left padding of the first row
    layers = llama.model.layers
    v_proj: dict[int, torch.Tensor] = {}  # layer -> [batch, pos, kv_head * d_head]
    o_proj: dict[int, torch.Tensor] = {}  # layer -> [batch, pos, head * d_head]
    hooks = []
    for i, layer in enumerate(layers):
        attention = layer.self_attn
        hooks.append(attention.v_proj.register_forward_hook(
            lambda _m, _a, out, i=i: v_proj.__setitem__(i, out)))  # fmt: skip
        hooks.append(attention.o_proj.register_forward_pre_hook(
            lambda _m, args, i=i: o_proj.__setitem__(i, args[0])))  # fmt: skip
    seen = []
    options = dict(received=True, q_positions=q_positions, **KW)
    try:
        with torch.no_grad():
            with StreamedRecorder(llama, **options) as plain:
                llama(ids, attention_mask=mask)
            with StreamedRecorder(llama, on_attention=lambda *a: seen.append(a), **options) as rec:
                llama(ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert [layer for layer, _, _ in seen] == [0, 1]
    d_head = llama.config.hidden_size // llama.config.num_attention_heads
    for layer, call, output in seen:  # value [b, kv, pos, d]; output [b, head, pos, d]
        assert call.layer == layer
        want = v_proj[layer].view(batch, seq, -1, d_head).transpose(1, 2)
        torch.testing.assert_close(call.value, want, atol=0, rtol=0)
        torch.testing.assert_close(
            output.transpose(1, 2).reshape(batch, seq, -1), o_proj[layer], atol=0, rtol=0
        )
    for got, want in zip(rec.stats, plain.stats, strict=True):
        for name in (*FIELDS, "lse", "argmax"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=0, rtol=0)
    for got, want in zip(rec.received, plain.received, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "target, actual, current, expected",
    [
        ("cpu", "cpu", 0, True),
        ("cpu", "cuda:0", 0, False),
        ("cuda:1", "cuda:1", 0, True),
        ("cuda:0", "cuda:1", 0, False),
        ("cuda", "cuda:0", 0, True),  # "cuda" is the current GPU
        ("cuda", "cuda:1", 0, False),
        ("cuda", "cuda:1", 1, True),
        ("cuda", "cpu", 0, False),
    ],
)
def test_the_recorder_skips_only_copies_that_would_not_move(
    monkeypatch, target, actual, current, expected
):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    assert _already_on(torch.device(target), torch.device(actual)) is expected
