import pytest
import torch

from interventions.repair import self_repair
from workbench.tasks import NextToken

PROMPTS = ["the cat sat on the", "the dog ran to the", "it was a big red"]


@pytest.fixture(scope="module")
def task():
    return NextToken(PROMPTS, ["mat", "park", "house"], ["dog", "mat", "tree"])


@torch.no_grad()
def test_direct_effect_is_the_head_logit_attribution(tiny_model, task):
    """direct = clean − W_U·(norm weight ⊙ z_h W_O^h / rms(clean final residual)), by hand."""
    model = tiny_model
    frame = self_repair(model, task, [(1, 3), (0, 1)])
    hf, d = model.hf, model.info.d_head
    expected = []
    for layer, head in [(1, 3), (0, 1)]:
        values = []
        for prompt, t, f in zip(PROMPTS, ["mat", "park", "house"], ["dog", "mat", "tree"],
                                strict=True):  # fmt: skip
            ids = model.tokenize(prompt)[None]
            store = {}
            o_proj = hf.model.layers[layer].self_attn.o_proj
            h1 = o_proj.register_forward_pre_hook(lambda _m, a, s=store: s.setdefault("z", a[0]))
            h2 = hf.model.norm.register_forward_pre_hook(
                lambda _m, a, s=store: s.setdefault("r", a[0])
            )
            logits = hf(ids).logits[0, -1]
            h1.remove(), h2.remove()
            z = store["z"][0, -1, head * d : (head + 1) * d]
            out = o_proj.weight[:, head * d : (head + 1) * d] @ z
            resid = store["r"][0, -1]
            rms = resid.pow(2).mean().add(hf.model.norm.variance_epsilon).rsqrt()
            tid, fid = (
                model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (t, f)
            )
            direction = hf.lm_head.weight[tid] - hf.lm_head.weight[fid]
            clean = logits[tid] - logits[fid]
            values.append(float(clean - (direction * hf.model.norm.weight) @ out * rms))
        expected.append(sum(values) / len(values))
    assert frame["direct"].tolist() == pytest.approx(expected, abs=1e-4)
    share = 1 - frame["total_effect"] / frame["direct_effect"]
    torch.testing.assert_close(torch.tensor(share.to_numpy()),
                               torch.tensor(frame["restored_share"].to_numpy()))  # fmt: skip
    assert set(frame.columns) >= {"clean", "direct", "total", "restored_share"}


def test_no_change_no_effect(tiny_model, task):
    frame = self_repair(tiny_model, task, ["1.2"], kind="scale", options={"factor": 1.0})
    assert frame.loc[0, "direct_effect"] == pytest.approx(0, abs=1e-6)
    assert frame.loc[0, "total_effect"] == pytest.approx(0, abs=1e-6)


def test_direct_effects_match_self_repair(tiny_model, task):
    from interventions.repair import direct_effects

    table = direct_effects(tiny_model, task, batch_size=2)
    assert len(table) == tiny_model.info.n_layers * tiny_model.info.n_heads
    assert (table["direct_effect"].diff().dropna() <= 0).all()
    pick = [(int(r.layer), int(r.head)) for r in table.head(2).itertuples()]
    repair = self_repair(tiny_model, task, pick)
    assert repair["direct_effect"].tolist() == pytest.approx(
        table["direct_effect"].head(2).tolist(), abs=1e-4
    )
