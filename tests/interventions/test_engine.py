"""The engine on a tiny random Llama: both capture paths agree kind by kind, groups are
independent, and zero ablation matches zeroing the head's slice of W_O's input by hand."""

import pytest
import torch

from interventions.engine import Intervener, intervene
from interventions.specs import ZeroAblation, load_specs
from workbench.errors import InterventionError, ShapeError

SPECS = load_specs(
    [
        {"kind": "zero", "heads": [[0, 1], [1, 2]]},
        {"kind": "scale", "heads": [[1, 3]], "factor": 2.5, "positions": [-1, 3]},
        {"kind": "resample", "heads": [[0, 0]]},
        {"kind": "resample", "heads": [[0, 2]], "source": "shuffled"},
        {"kind": "patch_output", "heads": [[1, 0]], "source": "corrupted"},
        {"kind": "mean", "heads": [[1, 1]]},
        {"kind": "uniform", "heads": [[0, 3], [1, 1]]},
        {"kind": "first_token", "heads": [[1, 2]]},
        {"kind": "redistribute", "heads": [[0, 1]], "sinks": [0, 1], "beta": 0.3},
        {"kind": "redistribute", "heads": [[1, 1]], "threshold": 0.1, "exclude_first": False},
        {"kind": "redistribute", "heads": [[0, 2]], "sinks": [0], "receivers": [[4, 8]]},
        {"kind": "patch_pattern", "heads": [[1, 3], [0, 0]], "source": "corrupted"},
    ]
)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 35, (3, 12), generator=g), torch.randint(3, 35, (3, 12), generator=g)


def test_paths_agree_on_every_kind(tiny_model, batch):
    """The same intervention through TransformerLens hooks and the streamed attention function."""
    tokens, corrupted = batch
    iv = Intervener(tiny_model)
    means = iv.mean_outputs([tokens, corrupted], range(2))
    groups = [[], *[[s] for s in SPECS], [s for s in SPECS if s.acts_on == "output"]]
    kwargs = dict(sources={"corrupted": corrupted}, means=means)
    hooks = iv.run(tokens, groups, path="pattern", **kwargs).logits
    streamed = iv.run(tokens, groups, path="streamed", **kwargs).logits
    torch.testing.assert_close(hooks, streamed, atol=2e-5, rtol=1e-4)
    for g, group in enumerate(groups[1:], start=1):  # every spec changes something
        assert (hooks[g] - hooks[0]).abs().max() > 1e-4, group


def test_groups_are_independent(tiny_model, batch):
    tokens, _ = batch
    iv = Intervener(tiny_model, max_rows=4)  # forces one group per pass
    together = iv.run(tokens, [[], [SPECS[0]], [SPECS[6]]], path="streamed").logits
    alone = iv.run(tokens, [[SPECS[6]]], path="streamed").logits
    torch.testing.assert_close(together[2], alone[0])
    plain = tiny_model.hf(tokens).logits
    torch.testing.assert_close(together[0], plain, atol=1e-5, rtol=1e-5)


def test_zero_matches_hand_ablation(tiny_model, batch):
    tokens, _ = batch
    d = tiny_model.info.d_head
    o_proj = tiny_model.hf.model.layers[1].self_attn.o_proj

    def zero_head_2(_module, args):
        x = args[0].clone()
        x[..., 2 * d : 3 * d] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_head_2)
    try:
        expected = tiny_model.hf(tokens).logits
    finally:
        handle.remove()
    for path in ("pattern", "streamed"):
        got = intervene(tiny_model, tokens, ZeroAblation(heads=[(1, 2)]), path=path)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_positions_and_keep(tiny_model, batch):
    tokens, _ = batch
    spec = ZeroAblation(heads=[(1, 0)], positions=[-1])
    last = intervene(tiny_model, tokens, spec, keep=1, path="streamed")
    clean = tiny_model.hf(tokens).logits
    full = intervene(tiny_model, tokens, spec, path="pattern")
    torch.testing.assert_close(full[:, :-1], clean[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    assert (full[:, -1] - clean[:, -1]).abs().max() > 1e-4


def test_long_prompt_takes_the_streamed_path(tiny_model, monkeypatch):
    """Above the pattern path's limit, `auto` never builds the bridge (limit lowered to 16)."""
    monkeypatch.setattr("workbench.capture.paths.PATTERN_PATH_MAX_TOKENS", 16)
    iv = Intervener(tiny_model)
    monkeypatch.setattr(type(tiny_model), "bridge", lambda self: pytest.fail("bridge used"))
    tokens = torch.randint(3, 35, (1, 40), generator=torch.Generator().manual_seed(1))
    spec = load_specs({"kind": "redistribute", "heads": [[0, 1]], "sinks": [0], "beta": 0.0})
    out = iv.run(tokens, [[], spec], keep=1).logits
    assert out.shape[:3] == (2, 1, 1) and (out[1] - out[0]).abs().max() > 0


def test_errors(tiny_model, batch):
    tokens, _ = batch
    iv = Intervener(tiny_model)
    with pytest.raises(InterventionError, match="outside"):
        iv.run(tokens, [[ZeroAblation(heads=[(2, 0)])]])
    with pytest.raises(InterventionError, match="'corrupted'"):
        iv.run(tokens, [[SPECS[2]]])
    with pytest.raises(ShapeError, match="align token by token"):
        iv.run(tokens, [[SPECS[2]]], sources={"corrupted": tokens[:, :5]})
    with pytest.raises(InterventionError, match="mean outputs"):
        iv.run(tokens, [[SPECS[5]]])
    with pytest.raises(InterventionError, match="two attention-pattern"):
        iv.run(tokens, [[SPECS[6], SPECS[9]]])
    with pytest.raises(InterventionError, match="positions"):
        iv.run(tokens, [[ZeroAblation(heads=[(0, 0)], positions=[40])]])
    with pytest.raises(InterventionError, match="shuffled"):
        iv.run(tokens[:1], [[SPECS[3]]])
    with pytest.raises(ShapeError):
        iv.run(tokens[0], [[]])
