import pytest
import torch

from interventions.tasks import IOI, Loss, Needle, Toy, make_task
from workbench.errors import InterventionError


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


def test_make_task():
    assert isinstance(make_task("needle", length=256), Needle)
    with pytest.raises(InterventionError, match="unknown task"):
        make_task("squad")
    with pytest.raises(InterventionError, match="task 'ioi'"):
        make_task("ioi", lenght=3)


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
