import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

from probes.sinks import HIDDEN_SINK_THRESHOLD, _written_norms, head_blocks, sink_statistics
from tests.architectures.families import BY_NAME, build, prompt_ids, tokenizer
from workbench.capture import head_statistics
from workbench.errors import CaptureError, ShapeError
from workbench.models import Model, from_hf
from workbench.scanner import scan
from workbench.tasks import PromptSet

TEXT = "when mary and john went to the store john gave a drink to mary and the cat sat on the mat"


def test_sink_statistics_follow_their_definitions(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    n = len(ids)
    stats = sink_statistics(tiny_model, ids, min_queries=4, path="pattern")
    bridge = tiny_model.bridge()
    _, cache = bridge.run_with_cache(ids[None])
    group = tiny_model.info.group_size
    for layer in range(tiny_model.info.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q_pos, k_pos]
        alpha = pattern.sum(1) / torch.arange(n, 0, -1)  # [head, k_pos]: ACT's c_k / (N - k)
        keys = torch.arange(1, n - 3)  # k >= 1 and seen by >= 4 queries
        best = alpha[:, keys].max(-1)
        np.testing.assert_allclose(stats["hidden_sink_score"][layer], best.values, atol=1e-6)
        np.testing.assert_array_equal(stats["hidden_sink_position"][layer], keys[best.indices])
        np.testing.assert_array_equal(
            stats["hidden_sink_token"][layer], ids[keys[best.indices]].float()
        )
        count = (alpha[:, keys] > HIDDEN_SINK_THRESHOLD).sum(-1)
        np.testing.assert_array_equal(stats["hidden_sink_count"][layer], count.float())
        v = cache[f"blocks.{layer}.attn.hook_v"][0]  # [pos, kv_head, d_head]
        for head in range(tiny_model.info.n_heads):
            written = v[:, head // group] @ bridge.W_O[layer, head]  # [pos, d_model]
            norms = written.norm(dim=-1)
            assert stats["value_norm_first"][layer, head] == pytest.approx(norms[0].item(), 1e-5)
            assert stats["value_norm_other"][layer, head] == pytest.approx(
                norms[1:].mean().item(), 1e-5
            )
        resid = cache[f"blocks.{layer}.hook_resid_pre"][0].norm(dim=-1)  # [pos]
        assert stats["residual_norm_first"][layer] == pytest.approx(resid[0].item(), 1e-5)


def test_sink_statistics_agree_across_capture_paths(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    pattern = sink_statistics(tiny_model, ids, min_queries=2, path="pattern")
    streamed = sink_statistics(tiny_model, ids, min_queries=2, path="streamed")
    assert pattern.keys() == streamed.keys()
    for name in pattern:
        np.testing.assert_allclose(streamed[name], pattern[name], atol=1e-5, err_msg=name)


def test_sink_statistics_need_two_tokens(tiny_model):
    with pytest.raises(ShapeError, match=">= 2 tokens"):
        sink_statistics(tiny_model, torch.tensor([1]))


def test_sink_probes_fill_tables_and_labels(tiny_model):
    prompts = PromptSet("p", (TEXT, "the dog ran to the park and the bird sat on the tree"))
    result = scan(
        tiny_model, prompts, probes="sink,hidden_sink,value_drain,residual_peak", progress=False
    )
    assert set(result.tables) == {
        "sink", "hidden_sink", "hidden_sink_count", "value_drain", "residual_peak"
    }  # fmt: skip
    hidden = result.tables["hidden_sink"]
    assert hidden.threshold == HIDDEN_SINK_THRESHOLD
    assert ((hidden.selected | hidden.tentative) == (hidden.values > 0.1)).all()
    assert (hidden.interval.low[hidden.selected] > 0.1).all()  # labelled: lower bound above
    peak = result.tables["residual_peak"].values  # per layer, repeated over heads
    assert (peak == peak[:, :1]).all()
    assert result.tables["value_drain"].values.shape == (2, 4)


@functools.cache
def family_model(name: str) -> Model:
    """A tiny random model of an architecture-matrix family (tests/architectures/families.py)."""
    return from_hf(build(BY_NAME[name]), tokenizer(), name=f"sinks-{name}")


# Output projections the streamed path finds by what they read, not by name: Conv1D c_proj
# (GPT-2), fused qkv_proj (Phi-3), query_key_value/dense (GPT-NeoX), out_proj with biases (OPT),
# MLA with d_v != d_qk (DeepSeek-V3), a bidirectional encoder whose dense sits in a sibling
# module (BERT), a sliding window (Mistral) and learned sink logits (gpt-oss).
@pytest.mark.parametrize(
    "family", ["gpt2", "phi3", "gpt-neox", "opt", "deepseek-v3", "bert", "mistral", "gpt-oss"]
)
def test_streamed_sinks_agree_with_the_pattern_path_on_other_families(family):
    model = family_model(family)
    ids = prompt_ids()[0]  # [48]
    pattern = sink_statistics(model, ids, min_queries=4, path="pattern")
    streamed = sink_statistics(model, ids, min_queries=4, path="streamed")
    for name in pattern:
        np.testing.assert_allclose(
            streamed[name], pattern[name], rtol=1e-5, atol=1e-5, err_msg=name
        )


def test_streamed_value_norms_follow_their_definition_on_modernbert():
    """ModernBERT (fused Wqkv, Wo; no TransformerLens adapter, so no pattern path): the value
    norms equal ||v_j W_O^h|| from Wqkv's output and Wo's weight, read here by name."""
    model = family_model("modernbert")
    n_heads = model.info.n_heads
    ids = prompt_ids()[0]
    attention = [
        model.hf.get_submodule(f"model.layers.{i}.attn") for i in range(model.info.n_layers)
    ]
    qkv: list[torch.Tensor] = []  # per layer [pos, 3 * head * d_head]

    def keep(_module, _args, out: torch.Tensor) -> None:  # [1, pos, 3 * head * d_head]
        qkv.append(out[0].detach())

    handles = [module.Wqkv.register_forward_hook(keep) for module in attention]
    try:
        stats = sink_statistics(model, ids, path="streamed")
    finally:
        for handle in handles:
            handle.remove()
    for layer, module in enumerate(attention):
        v = qkv[layer].view(len(ids), 3, n_heads, -1)[:, 2]  # [pos, head, d_head]
        w_o = module.Wo.weight.detach().view(-1, n_heads, v.shape[-1])  # [d_model, head, d_head]
        norms = torch.einsum("phd,mhd->phm", v, w_o).norm(dim=-1)  # [pos, head]
        np.testing.assert_allclose(stats["value_norm_first"][layer], norms[0], rtol=1e-5)
        np.testing.assert_allclose(stats["value_norm_other"][layer], norms[1:].mean(0), rtol=1e-5)


def assert_refused_to_pattern_path(run) -> None:
    with pytest.raises(CaptureError, match="path='pattern'") as caught:
        run()
    assert "\n" not in str(caught.value)


def test_streamed_sinks_refuse_attention_outside_the_swap():
    """Falcon computes attention itself: no attention function can be swapped in."""
    model = family_model("falcon")
    assert_refused_to_pattern_path(lambda: sink_statistics(model, prompt_ids()[0], path="streamed"))


def test_streamed_sinks_refuse_an_output_changed_before_its_projection(tiny_model):
    """A gate on the attention output (here: x2 before o_proj) leaves no linear layer reading
    the heads' outputs as they are, so there is no W_O^h to write values with."""
    o_proj = tiny_model.hf.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: (2 * args[0],))
    try:
        assert_refused_to_pattern_path(
            lambda: sink_statistics(tiny_model, tiny_model.tokenize(TEXT), path="streamed")
        )
    finally:
        handle.remove()
    sink_statistics(tiny_model, tiny_model.tokenize(TEXT), path="streamed")  # hooks all removed


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    d_v=st.integers(1, 12),
    d_model=st.integers(1, 24),
    pos=st.integers(1, 6),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_written_norms_are_norms_of_v_times_w_o(n_kv, group, d_v, d_model, pos, conv1d, seed):
    """||v_j W_O^h|| through the QR factor equals the direct product, for nn.Linear and Conv1D
    projections, grouped heads and d_model below or above d_v."""
    torch.manual_seed(seed)
    n_heads = n_kv * group
    if conv1d:
        projection = Conv1D(d_model, n_heads * d_v)  # weight [head * d_v, d_model]
        torch.nn.init.normal_(projection.weight)
    else:
        projection = torch.nn.Linear(n_heads * d_v, d_model)  # weight [d_model, head * d_v]
    v = torch.randn(pos, n_kv, d_v)
    w_o = head_blocks(projection, n_heads)  # [head, d_v, d_model]
    assert w_o.shape == (n_heads, d_v, d_model)
    heads_side_by_side = torch.zeros(n_heads, pos, n_heads * d_v)
    for h in range(n_heads):  # head h alone at the projection's input, minus its bias
        heads_side_by_side[h, :, h * d_v : (h + 1) * d_v] = v[:, h // group]
    want = (projection(heads_side_by_side) - projection.bias).norm(dim=-1).T  # [pos, head]
    torch.testing.assert_close(_written_norms(v, w_o), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["pattern", "streamed"])
def test_learned_sinks_get_their_own_table(path):
    """gpt-oss's learned sink logits: the sink probe adds a ``learned_sink`` table whose scores
    are the per-prompt means of the capture layer's ``learned_sink_mass`` (both paths); a model
    without learned sinks gets no such table."""
    texts = tuple(tokenizer().decode(prompt_ids()[0, 1:]).split(" ")[i::2] for i in range(2))
    prompts = PromptSet("learned", tuple(" ".join(words) for words in texts))
    gpt_oss = from_hf(build(BY_NAME["gpt-oss"]), tokenizer(), name="matrix-gpt-oss")
    result = scan(gpt_oss, prompts, probes="sink", path=path, progress=False)
    table = result.tables["learned_sink"]
    per_prompt = [
        head_statistics(gpt_oss, gpt_oss.tokenize(text), path=path)["learned_sink_mass"]
        for text in prompts.texts
    ]
    np.testing.assert_allclose(table.values, np.mean(per_prompt, axis=0), atol=1e-6)
    assert table.values.min() > 0 and table.values.max() < 1
    llama = from_hf(build(BY_NAME["llama"]), tokenizer(), name="matrix-llama")
    assert (
        "learned_sink" not in scan(llama, prompts, probes="sink", path=path, progress=False).tables
    )
