import json

import numpy as np
import pytest
import torch

from probes.retrieval import (
    WU_DEPTHS,
    RetrievalProbe,
    preset_lengths,
    report,
    score_decode,
    score_forced,
    stability,
    trials_for,
)
from workbench.builtins import TOY_MODELS_DIR
from workbench.errors import ProbeOptionError
from workbench.models import load
from workbench.probe import ScanContext
from workbench.scanner import scan
from workbench.scores import item_means
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
    np.testing.assert_allclose(item_means(trials), 0.5)
    assert np.isnan(item_means(trials[1:2])).all()


def test_options_are_checked(tiny_model):
    probe = RetrievalProbe()
    for options, message in [
        ({"retrieval_variant": "beam"}, "retrieval_variant must be"),
        ({"retrieval_lengths": "100000"}, "exceed the model's context of 256"),
        ({"retrieval_depths": "0.5,2"}, "must lie in"),
        ({"retrieval_task": "code"}, "retrieval_task must be"),
        ({"retrieval_lengths": "abc"}, "a comma list or a JSON list"),
        ({"retrieval_lengths": "64.5"}, "retrieval_lengths='64.5'"),
        ({"retrieval_preset": "paper"}, "retrieval_preset must be"),
        ({"retrieval_preset": "wu2024", "retrieval_n_lengths": 0}, "retrieval_n_lengths >= 1"),
    ]:
        ctx = ScanContext(tiny_model, PromptSet("none", ["x"]), options=options)
        with pytest.raises(ProbeOptionError, match=message):
            probe.measurements(ctx)


@pytest.mark.parametrize("value", [64, "64", "64,", "[64]", [64], (64,)])
def test_a_single_length_is_accepted_in_every_form(tiny_model, value):
    """Issue 16: ``--option retrieval_lengths=1024`` was refused ("expected tuple")."""
    ctx = ScanContext(tiny_model, PromptSet("none", ["x"]), options={"retrieval_lengths": value})
    _, trials = trials_for(ctx)
    assert {t.length for t in trials} == {64}


def test_wu2024_preset_spans_the_context_with_the_reference_depths(tiny_model):
    ctx = ScanContext(
        tiny_model,
        PromptSet("none", ["x"]),
        options={"retrieval_preset": "wu2024", "retrieval_n_lengths": 3, "retrieval_needles": 1},
    )
    _, trials = trials_for(ctx)
    top = tiny_model.info.max_context - 50  # room for the 50 decoding steps
    assert sorted({t.length for t in trials}) == [top // 4, (top // 4 + top) // 2, top]
    assert sorted({t.depth for t in trials}) == list(WU_DEPTHS)
    assert WU_DEPTHS[:3] == (0.0, 0.11, 0.22) and WU_DEPTHS[-1] == 1.0
    assert len(trials) == 3 * 10
    capped = ScanContext(
        tiny_model,
        PromptSet("none", ["x"]),
        options={
            "retrieval_preset": "wu2024",
            "retrieval_max_length": 100,
            "retrieval_n_lengths": 1,
            "retrieval_depths": 0,
        },
    )
    assert [t.length for t in trials_for(capped)[1]] == [100] * 3  # the user's cap, 3 needles


def test_preset_lengths_follow_the_reference_spacing():
    assert preset_lengths(50000, 20)[:3] == (1000, 3579, 6158)  # np.linspace(1000, 50000, 20)
    assert preset_lengths(50000, 20)[-1] == 50000 and len(preset_lengths(50000, 20)) == 20
    small = preset_lengths(40, 20)  # a toy context: from a quarter of it, repeats dropped
    assert small[0] == 10 and small[-1] == 40 and list(small) == sorted(set(small))
    assert preset_lengths(40, 1) == (40,)  # one length: the longest


def test_stability_halves_lengths_and_trial_counts():
    rng = np.random.default_rng(0)
    per_trial = rng.uniform(0, 0.05, (16, 2, 3))
    per_trial[:, 0, 0] = rng.uniform(0.5, 0.7, 16)  # a clear retrieval head
    per_trial[3] = np.nan  # a trial that did not count
    lengths = np.repeat([100, 200], 8)
    got = stability(per_trial, lengths)
    assert got["halves"] == {"trials": [8, 8], "labelled": [1, 1], "jaccard": 1.0}
    assert [row["trials"] for row in got["by_trials"]] == [2, 4, 8, 16]
    assert got["by_trials"][-1] == {"trials": 16, "labelled": 1, "jaccard_with_all": 1.0}

    per_trial[:8, 1, 2] = 0.4  # a head only at the shorter length
    first, second = stability(per_trial, lengths)["by_length"]
    assert (first["length"], first["trials"], first["counted"]) == (100, 8, 7)
    assert (second["length"], second["trials"], second["counted"]) == (200, 8, 8)
    # all lengths together label both heads (1.2 scores 0.2 on average); 200 finds one of them
    assert first["labelled"] == 2 and first["jaccard_with_all"] == 1.0
    assert second["labelled"] == 1 and second["jaccard_with_all"] == 0.5

    empty = stability(np.zeros((4, 2, 3)), np.full(4, 100))
    assert empty["halves"]["jaccard"] is None  # nothing labelled: nothing to compare


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
        assert table.parameters["stability"]["halves"]["jaccard"] == 1.0
    text = report(str(tmp_path / "toy.h5"))
    n_heads = result.tables["retrieval"].values.size
    assert text.count(f"labelled {len(expected)}/{n_heads}") == 2  # both variants
    assert "halves of the trials" in text and "agreement decode vs forced" in text


def _ground_truth(truth: dict, role: str) -> set[tuple[int, int]]:
    """Ground-truth heads (heads.json, workbench.toys.cards) whose role names ``role``."""
    return {(h["layer"], h["head"]) for h in truth["heads"] if role in h["role"]}
