import json

import numpy as np
import pytest
import torch

from probes.retrieval import RetrievalProbe, mean_over_counted, score_decode, score_forced
from workbench.errors import ProbeOptionError
from workbench.models import TOY_MODELS_DIR, load
from workbench.probe import ScanContext
from workbench.scanner import scan
from workbench.tasks import PromptSet
from workbench.tasks.needle import NeedleTrial, needle_grid, rouge1_recall


@torch.no_grad()
def reference_scores(model, prompt, generated, span):
    """The reference's ``retrieval_calculate``: eager attention rows, topk(1), span and token."""
    hf = model.hf
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        ids = torch.tensor([*prompt, *generated])
        attentions = hf(ids[None], output_attentions=True).attentions  # [1, head, q, k] per layer
    finally:
        hf.set_attn_implementation(previous)
    scores = np.zeros((model.info.n_layers, model.info.n_heads))
    for t, token in enumerate(generated):
        row = len(prompt) - 1 + t  # the query whose next token is generated[t]
        for layer, pattern in enumerate(attentions):
            for head in range(model.info.n_heads):
                j = int(pattern[0, head, row].topk(1).indices)
                if span[0] <= j < span[1] and int(ids[j]) == token:
                    scores[layer, head] += 1 / (span[1] - span[0])
    return scores


def trial(ids, span, answer=(3,)):
    return NeedleTrial(
        np.asarray(ids), span, span, np.asarray(answer), "x", "q", len(ids), 0, -1, 0
    )


def test_decode_matches_the_reference_loop(tiny_model):
    rng = np.random.default_rng(3)
    t = trial([1, *rng.integers(3, 35, 40)], (1, 41))
    result = score_decode(tiny_model, t, max_new_tokens=8)
    assert len(result.response_ids) == 8
    expected = reference_scores(tiny_model, t.token_ids, result.response_ids, t.answer_span)
    assert expected.sum() > 0  # the comparison is not between two empty tables
    np.testing.assert_allclose(result.scores, expected, atol=1e-6)


def test_forced_matches_the_reference_on_the_answer_tokens(tiny_model):
    rng = np.random.default_rng(0)
    ids = [1, *rng.integers(3, 35, 20), *[20] * 10, *rng.integers(3, 35, 10)]
    t = trial(ids, (21, 31), answer=(20, 20, 20))  # the span holds the answer token only
    result = score_forced(tiny_model, t)
    expected = reference_scores(tiny_model, t.token_ids, [20, 20, 20], t.answer_span)
    assert expected.sum() > 0
    np.testing.assert_allclose(result.scores, expected, atol=1e-6)
    assert len(result.response_ids) == 3 and 0 <= result.recall <= 1


def test_rouge_and_counted_mean():
    assert rouge1_recall("take a walk in the park", "\n\nTake a WALK.") == pytest.approx(3 / 6)
    assert rouge1_recall("7481", "the number is 7481.") == 1.0
    assert rouge1_recall("a a b", "a b") == pytest.approx(2 / 3)  # multiplicity counts
    trials = np.stack([np.ones((2, 3)), np.full((2, 3), np.nan), np.zeros((2, 3))])
    np.testing.assert_allclose(mean_over_counted(trials), 0.5)
    assert np.isnan(mean_over_counted(trials[1:2])).all()


def test_options_are_checked(tiny_model):
    probe = RetrievalProbe()
    for options, message in [
        ({"retrieval_variant": "beam"}, "retrieval_variant must be"),
        ({"retrieval_lengths": "100000"}, "exceed the model's context of 256"),
        ({"retrieval_depths": "0.5,2"}, "must lie in"),
        ({"retrieval_task": "code"}, "retrieval_task must be"),
        ({"retrieval_lengths": "abc"}, "comma list of numbers"),
    ]:
        ctx = ScanContext(tiny_model, PromptSet("none", ["x"]), options=options)
        with pytest.raises(ProbeOptionError, match=message):
            probe.measurements(ctx)


@pytest.mark.slow
def test_decode_and_forced_agree_on_smollm2(smollm2):
    """The two variants find the same top heads on a retrieved needle (the 19-token Beijing answer;
    docs/probes.md has the grid-wide comparison)."""
    (t,) = needle_grid(smollm2.tokenizer, [512], [0.5], needles=[0], seed=0)
    decode, forced = score_decode(smollm2, t, 40), score_forced(smollm2, t)
    assert decode.retrieved and forced.retrieved
    top = np.argsort(-decode.scores.ravel())[:3]
    assert (forced.scores.ravel()[top] > 0.1).all()
    assert np.corrcoef(decode.scores.ravel(), forced.scores.ravel())[0, 1] > 0.7


TOY = TOY_MODELS_DIR / "toy-recall"


@pytest.mark.skipif(
    not (TOY / "heads.json").is_file(),
    reason="toy-recall is not shipped (its training stays on the plateau, workbench/tasks/toy.py)",
)
def test_finds_the_ground_truth_retrieval_heads_of_toy_recall(tmp_path):
    truth = json.loads((TOY / "heads.json").read_text())
    expected = _ground_truth(truth, "retrieval")
    result = scan(
        load("toy-recall", device="cpu"),
        PromptSet("none", ["x"]),
        probes="retrieval",
        out=tmp_path / "toy.h5",
        options={"retrieval_variant": "both", "retrieval_trials": 2},
        progress=False,
    )
    for name in ("retrieval", "retrieval_forced"):
        table = result.tables[name]
        assert table.parameters["counted_trials"] >= table.parameters["trials"] // 2
        found = {(int(a), int(b)) for a, b in zip(*np.nonzero(table.selected), strict=True)}
        assert found == expected, name


def _ground_truth(truth: dict, role: str) -> set[tuple[int, int]]:
    """Ground-truth heads (heads.json, workbench.toys.cards) whose role names ``role``."""
    return {(h["layer"], h["head"]) for h in truth["heads"] if role in h["role"]}
