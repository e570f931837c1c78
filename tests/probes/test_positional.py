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
