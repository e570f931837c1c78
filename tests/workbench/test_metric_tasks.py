"""The metric tasks (workbench.tasks.metric): batches line up, scores read the right logits."""

import re
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from workbench.tasks import IOI, Loss, Needle, Toy, get_task
from workbench.tasks.templated import build_pair


def _one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits that predict exactly the next token of each row: ``[batch, seq, vocab]``."""
    nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
    return torch.nn.functional.one_hot(nxt, vocab).float() * 30


def test_needle_teacher_forcing(tiny_model):
    task = Needle(length=60, depths=(0.2, 0.8), needles=(2,))
    batches = task.batches(tiny_model, 8)
    assert sum(len(b.tokens) for b in batches) == 2
    for b in batches:
        answer = b.data["answer"]
        assert b.keep == answer.shape[1]
        # the prompt is followed by the answer but its last token
        torch.testing.assert_close(b.tokens[:, b.tokens.shape[1] - b.keep + 1 :], answer[:, :-1])
        perfect = torch.nn.functional.one_hot(answer, 40).float()
        scores = task.score(perfect, b)
        assert scores["answer_accuracy"].tolist() == [1.0] * len(answer)
        assert scores["exact"].tolist() == [1.0] * len(answer)
        wrong = perfect.clone()
        wrong[:, 0] = wrong[:, 0].roll(1, -1)
        assert (task.score(wrong, b)["exact"] == 0).all()


def test_loss_windows(tiny_model):
    task = Loss(n=3, length=9, text="the cat sat on the mat " * 20, seed=2)
    (batch,) = task.batches(tiny_model, 8)
    assert batch.tokens.shape == (3, 9) and batch.keep is None
    assert (batch.tokens[:, 0] == tiny_model.tokenizer.bos_token_id).all()
    perfect = _one_hot(batch.tokens, 40)
    assert task.score(perfect, batch)["loss"].max() < 1e-3


@pytest.mark.parametrize("name", ["toy-bb", "toy-recall", "toy-ioi"])
def test_toy_task_scores(name):
    task = Toy(model_name=name, n=6, seed=0)
    batches = task.batches(None, 4)
    assert [len(b.tokens) for b in batches] == [4, 2]
    assert task.metrics[0] == "accuracy"
    assert ("logit_diff" in task.metrics) == (name == "toy-ioi")
    for b in batches:
        scores = task.score(_one_hot(b.tokens, 100), b)
        assert scores["accuracy"].tolist() == [1.0] * len(b.tokens)
        if "logit_diff" in scores:
            assert (scores["logit_diff"] == 30).all()
        flat = torch.zeros(*b.tokens.shape, 100)
        assert task.score(flat, b)["accuracy"].max() < 1  # ties: argmax is token 0


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (punctuation split off and unknown, <bos> first)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", pad_token="<pad>"
    )


@pytest.mark.parametrize("name", ["ioi-toy", "colored-objects"])
def test_templated_tasks_batch_their_pairs(name):
    task = get_task(name, kind="templated", n=10, seed=3)
    spec = task.templated
    words = {w for t in spec.templates for w in re.findall(r"\w+", re.sub(r"\{\w+\}", " ", t))}
    for field in ("names", "places", "objects", "colors"):
        words |= set(getattr(spec, field, ()))
    model = SimpleNamespace(tokenizer=_word_tokenizer(sorted(words)))
    clean, corrupted = build_pair(spec, model.tokenizer, 10, seed=3)
    batches = task.batches(model, 4)
    assert sorted(i for b in batches for i in b.index) == list(range(10))
    for b in batches:
        assert b.variants["corrupted"].shape == b.tokens.shape and b.keep == 1
        width = b.tokens.shape[1]
        assert torch.equal(b.tokens, clean.tokens[b.index, :width])  # each prompt unpadded
        assert torch.equal(b.variants["corrupted"], corrupted.tokens[b.index, :width])
        logits = torch.zeros(len(b.index), 1, len(model.tokenizer))
        logits[torch.arange(len(b.index)), 0, b.data["target"]] = 2.0
        scores = task.score(logits, b)
        assert scores["logit_diff"].tolist() == [2.0] * len(b.index)
        assert scores["accuracy"].tolist() == [1.0] * len(b.index)


@pytest.mark.slow
def test_ioi_on_smollm2(smollm2):
    """The real model does IOI, and zeroing its top direct-logit heads hurts far more than as
    many random heads of the same layers (docs/interventions.md has the 32-prompt numbers)."""
    from interventions import evaluate

    task = IOI(n=8)
    (first, *_) = task.batches(smollm2, 8)
    assert first.variants["corrupted"].shape == first.tokens.shape
    spec = {"kind": "zero", "heads": [[23, 3], [29, 1], [23, 0]]}
    r = evaluate(smollm2, task, spec, n_controls=1, path="streamed")
    row = r.table.loc["logit_diff"]
    assert row["baseline"] > 3 and r.table.loc["accuracy", "baseline"] >= 0.75
    assert row["diff"] < -1.5 and row["ci_high"] < 0
    assert row["control_diff"] > row["diff"] + 1
