import numpy as np
import pytest
import torch
from transformer_lens import head_detector

from probes.positional import HEAD_TYPES, detection_pairs, positional_statistics
from workbench.errors import ProbeOptionError
from workbench.scanner import scan
from workbench.tasks import PromptSet
from workbench.tasks.domains import repeated_random_tokens

TEXT = "the cat sat on the mat and the cat ran to the park and the dog sat on the mat"


def test_detection_pairs_are_transformer_lens_patterns():
    tokens = torch.tensor([1, 5, 6, 5, 7, 6, 5, 5])
    pairs = detection_pairs(tokens.numpy())
    for name in HEAD_TYPES:
        expected = getattr(head_detector, f"get_{name}_head_detection_pattern")(tokens[None])
        ours = torch.zeros(len(tokens), len(tokens))
        q, k = pairs[name]
        ours[q, k] = 1
        torch.testing.assert_close(ours, expected, msg=name)


@pytest.mark.parametrize(("exclude_bos", "exclude_current"), [(False, False), (True, True)])
def test_scores_equal_detect_head(tiny_model, exclude_bos, exclude_current):
    bridge = tiny_model.bridge()
    tokens = bridge.to_tokens(TEXT)[0]
    ours = positional_statistics(
        tiny_model, tokens, path="pattern", exclude_bos=exclude_bos, exclude_current=exclude_current
    )
    for name in HEAD_TYPES:
        reference = head_detector.detect_head(
            bridge, TEXT, f"{name}_head", exclude_bos=exclude_bos,
            exclude_current_token=exclude_current, error_measure="mul",
        )  # fmt: skip
        np.testing.assert_allclose(ours[name], reference.numpy(), atol=1e-4, err_msg=name)


def test_paths_agree_on_repeated_tokens_and_on_text(tiny_model):
    repeated = torch.as_tensor(
        repeated_random_tokens(tiny_model.tokenizer, n_prompts=1, n_tokens=9)[0]
    )
    for tokens in (repeated, tiny_model.tokenize(TEXT)):
        for exclude in (False, True):
            pattern = positional_statistics(
                tiny_model, tokens, path="pattern", exclude_bos=exclude, exclude_current=exclude
            )
            streamed = positional_statistics(
                tiny_model, tokens, path="streamed", exclude_bos=exclude, exclude_current=exclude,
                max_forwards=64,
            )  # fmt: skip
            for name in pattern:
                np.testing.assert_allclose(streamed[name], pattern[name], atol=1e-5, err_msg=name)


def test_streamed_path_refuses_many_offsets(tiny_model):
    with pytest.raises(ProbeOptionError, match="streamed forwards"):
        positional_statistics(tiny_model, tiny_model.tokenize(TEXT), path="streamed")


def test_probe_tables_thresholds_and_options(tiny_model):
    result = scan(
        tiny_model, PromptSet("p", ("a",)), probes="positional", progress=False,
        options={"positional_tokens": 10, "positional_prompts": 2},
    )  # fmt: skip
    assert set(result.tables) == set(HEAD_TYPES)
    induction = result.tables["induction"]
    assert induction.parameters["coverage"] == pytest.approx(10 / 21, abs=1e-4)
    assert induction.threshold == pytest.approx(0.4 * 10 / 21, abs=1e-4)
    with pytest.raises(ProbeOptionError, match="positional_tokens"):
        scan(tiny_model, PromptSet("p", ("a",)), probes="positional", progress=False,
             options={"positional_tokens": 10_000})  # fmt: skip


@pytest.mark.slow  # a real model: ~30 s on 2 busy cores
def test_smollm2_scores_equal_detect_head(smollm2):
    bridge = smollm2.bridge()
    text = "The cat sat on the mat. The cat sat on the mat. The dog ran to the park."
    tokens = bridge.to_tokens(text)[0]
    ours = positional_statistics(smollm2, tokens, path="pattern", exclude_bos=True)
    for name in HEAD_TYPES:
        reference = head_detector.detect_head(bridge, text, f"{name}_head", exclude_bos=True)
        np.testing.assert_allclose(ours[name], reference.numpy(), atol=1e-4, err_msg=name)


def second_half_loss(model, tokens, n_tokens, heads):
    """Mean loss of the last ``n_tokens`` next-token predictions with the output of ``heads``
    zeroed (their slices of ``o_proj``'s input)."""
    info = model.info
    attention = {m.layer_idx: m for m in model.hf.modules() if hasattr(m, "o_proj")}
    handles = []
    for layer in {la for la, _ in heads}:
        chosen = [h for la, h in heads if la == layer]

        def zero(_, args, chosen=chosen):
            z = args[0].view(*args[0].shape[:2], info.n_heads, info.d_head).clone()
            z[:, :, chosen] = 0
            return (z.flatten(2),)

        handles.append(attention[layer].o_proj.register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            logits = model.hf(tokens).logits.float()  # [batch, pos, vocab]
    finally:
        for handle in handles:
            handle.remove()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return float(-logp[:, -n_tokens:].mean())  # the last n_tokens predictions


@pytest.mark.slow  # a real model and eight forwards: ~1 min on 2 busy cores
def test_smollm2_induction_heads_are_causal(smollm2):
    """The labelled induction heads carry in-context copying: zeroing them raises the loss on the
    repeated half far more than zeroing as many unlabelled heads of the same layers."""
    result = scan(smollm2, PromptSet("p", ("a",)), probes="positional", progress=False)
    selected = result.tables["induction"].selected
    heads = list(zip(*np.nonzero(selected), strict=True))
    assert 1 <= len(heads) <= 0.05 * selected.size  # a few heads, as in the literature
    n = 50
    tokens = torch.as_tensor(
        np.stack(repeated_random_tokens(smollm2.tokenizer, n_prompts=4, n_tokens=n, seed=1))
    )
    clean = second_half_loss(smollm2, tokens, n - 1, [])
    induction = second_half_loss(smollm2, tokens, n - 1, heads) - clean
    rng = np.random.default_rng(0)
    controls = []
    for _ in range(3):
        matched = [
            (layer, int(head))
            for layer in sorted({la for la, _ in heads})
            for head in rng.choice(
                np.flatnonzero(~selected[layer]), int(selected[layer].sum()), replace=False
            )
        ]
        controls.append(second_half_loss(smollm2, tokens, n - 1, matched) - clean)
    assert induction > 1.0 and induction > 3 * max(controls), (induction, controls)
