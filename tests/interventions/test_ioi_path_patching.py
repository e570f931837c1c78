"""Per-head evidence primitives (interventions.path_patching) against hand-written hook runs."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import workbench
from interventions import path_patching as pp
from workbench.errors import InterventionError
from workbench.tasks.ioi import toy_task
from workbench.tasks.toy import IndirectObject
from workbench.toys.vocab import build_tokenizer


def make_ioi_llama(path: Path, n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2) -> Path:
    """A random tiny Llama over the toy-ioi vocabulary (word-level tokenizer with <bos>)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(IndirectObject().words),
        bos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = workbench.load(str(make_ioi_llama(tmp_path_factory.mktemp("ioi-llama"))))
    task = toy_task()
    clean = task.build(model.tokenizer, 6, seed=0, templates=[0])
    abc = task.corrupt(clean, model.tokenizer, seed=1)
    return model, clean, abc, pp.record(model, clean), pp.record(model, abc, patterns=False)


def test_head_outputs_add_up_to_the_attention_output(setup):
    model, clean, _, rec, _ = setup
    _, cache = model.bridge().run_with_cache(clean.tokens)
    out = pp.head_outputs_at(model, rec.z, clean.end)  # [layer, head, batch, d_model]
    rows = torch.arange(len(clean))
    for layer in range(model.info.n_layers):
        attn_out = cache[f"blocks.{layer}.attn.hook_out"][rows, clean.end]
        torch.testing.assert_close(out[layer].sum(0), attn_out, atol=1e-5, rtol=1e-4)


def test_dla_is_the_logit_change_from_removing_the_head_from_the_final_residual(setup):
    model, clean, _, rec, _ = setup
    dla = pp.direct_logit_attribution(model, clean, rec.z, rec.final_scale)
    layer, head = 1, 2
    out = pp.head_outputs_at(model, rec.z, clean.end)[layer, head]  # [batch, d_model]
    rows = torch.arange(len(clean))
    scale = {}

    def keep_scale(s, hook):
        scale["clean"] = s.clone()

    def remove(x, hook):
        x = x.clone()
        x[rows, clean.end] -= out
        return x

    def frozen_scale(s, hook):
        return scale["clean"]

    bridge = model.bridge()
    base = bridge.run_with_hooks(clean.tokens, fwd_hooks=[("ln_final.hook_scale", keep_scale)])
    without = bridge.run_with_hooks(
        clean.tokens,
        fwd_hooks=[("ln_final.hook_in", remove), ("ln_final.hook_scale", frozen_scale)],
    )
    expected = clean.logit_diff(base) - clean.logit_diff(without)
    torch.testing.assert_close(dla[layer, head], expected, atol=1e-4, rtol=1e-3)


def manual_path_patch(model, clean, rec, rec_abc, sender, receiver, via, role):
    """Wang et al.'s three steps with one sender and one receiver, written out with hooks."""
    bridge = model.bridge()
    rows, pos = torch.arange(len(clean)), clean.positions[role]
    s_layer, s_head = sender
    r_layer, r_head = receiver
    index = r_head if via == "q" else model.info.kv_head(r_head)
    frozen = {}

    def freeze(z, hook):
        layer = int(hook.name.split(".")[1])
        z = rec.z[layer].clone()
        if layer == s_layer:
            z[:, :, s_head] = rec_abc.z[layer][:, :, s_head]
        return z

    def grab(act, hook):
        frozen["value"] = act[rows, pos, index].clone()

    hooks = [(pp.z_name(layer), freeze) for layer in range(model.info.n_layers)]
    bridge.run_with_hooks(
        clean.tokens, fwd_hooks=[*hooks, (f"blocks.{r_layer}.attn.hook_{via}", grab)]
    )

    def put(act, hook):
        act = act.clone()
        act[rows, pos, index] = frozen["value"]
        return act

    logits = bridge.run_with_hooks(
        clean.tokens, fwd_hooks=[(f"blocks.{r_layer}.attn.hook_{via}", put)]
    )
    return float(clean.logit_diff(logits).mean())


@pytest.mark.parametrize(("via", "role"), [("q", "END"), ("k", "S1+1"), ("v", "S2")])
def test_path_patching_matches_the_three_steps_written_out(setup, via, role):
    model, clean, _, rec, rec_abc = setup
    senders = [(0, 1), (0, 3), (1, 0)]
    receiver = (2, 1)
    # max_rows=12 puts two senders in a chunk, so the tiling is exercised too.
    result = pp.path_patch(
        model, clean, rec.z, rec_abc.z, senders, [receiver], via, role, max_rows=12
    )
    expected = [
        manual_path_patch(model, clean, rec, rec_abc, s, receiver, via, role) for s in senders
    ]
    torch.testing.assert_close(result.metric, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    assert ("grouped-query" in result.notes) == (via != "q")
    assert not torch.allclose(result.metric, torch.full((3,), result.clean_metric), atol=1e-6)


def test_path_patching_a_sender_with_an_unchanged_output_changes_nothing(setup):
    model, clean, _, rec, _ = setup
    result = pp.path_patch(model, clean, rec.z, rec.z, [(0, 0), (1, 3)], [(2, 0)], "q", "END")
    torch.testing.assert_close(
        result.metric, torch.full((2,), result.clean_metric), atol=1e-5, rtol=0
    )
    with pytest.raises(InterventionError, match="q, k or v"):
        pp.path_patch(model, clean, rec.z, rec.z, [(0, 0)], [(2, 0)], "z", "END")


def test_attribution_patching_tracks_exact_activation_patching(setup):
    from interventions.ioi import activation_patching

    model, clean, abc, rec, rec_abc = setup
    info = model.info
    heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    exact = torch.tensor(activation_patching(model, clean, abc, heads))
    clean_ld = float(clean.logit_diff(model.bridge()(clean.tokens)).mean())
    approx = (pp.attribution_patching(model, clean, rec_abc.z, rec.z) / abs(clean_ld)).reshape(-1)
    corr = torch.corrcoef(torch.stack([exact.float(), approx.float()]))[0, 1]
    assert corr > 0.8, (exact, approx)
    assert all(p.requires_grad for p in model.hf.parameters())  # restored after the backward


def test_activation_patching_matches_a_single_patched_run(setup):
    from interventions.ioi import activation_patching

    model, clean, abc, _, rec_abc = setup
    layer, head = 1, 1

    def patch(z, hook):
        z = z.clone()
        z[:, :, head] = rec_abc.z[layer][:, :, head]
        return z

    bridge = model.bridge()
    base = float(clean.logit_diff(bridge(clean.tokens)).mean())
    patched = bridge.run_with_hooks(clean.tokens, fwd_hooks=[(pp.z_name(layer), patch)])
    expected = (float(clean.logit_diff(patched).mean()) - base) / abs(base)
    got = activation_patching(model, clean, abc, [(layer, head)])[0]
    assert got == pytest.approx(expected, abs=1e-4)


def test_position_means_average_within_each_template():
    z = torch.arange(2 * 4 * 3 * 1 * 1, dtype=torch.float).reshape(2, 4, 3, 1, 1)
    groups = torch.tensor([0, 1, 0, 1])
    means = pp.position_means(z, groups)
    torch.testing.assert_close(means[:, 0], (z[:, 0] + z[:, 2]) / 2)
    torch.testing.assert_close(means[:, 3], (z[:, 1] + z[:, 3]) / 2)
