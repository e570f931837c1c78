"""The templated task generators: IOI (Wang et al. 2022) and Colored Objects."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from workbench.errors import TaskBuildError
from workbench.tasks.ioi import IOITask, paper_task, toy_task
from workbench.tasks.templated import build_pair
from workbench.tasks.toy import IndirectObject
from workbench.toys.vocab import build_tokenizer


@pytest.fixture(scope="module")
def toy_tokenizer():
    tok = build_tokenizer(IndirectObject().words)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


def check_ioi_invariants(clean, abc):
    b = torch.arange(len(clean))
    pos = clean.positions
    # The answer ids sit where the roles say, and the subject is repeated.
    assert torch.equal(clean.tokens[b, pos["IO"]], clean.answer_ids)
    assert torch.equal(clean.tokens[b, pos["S1"]], clean.wrong_ids)
    assert torch.equal(clean.tokens[b, pos["S2"]], clean.wrong_ids)
    assert torch.equal(pos["S1+1"], pos["S1"] + 1)
    assert bool((pos["S2"] < pos["END"]).all())
    orders = [m["order"] for m in clean.meta]
    for i, order in enumerate(orders):
        assert (pos["IO"][i] < pos["S1"][i]) == (order == "ABBA")
    assert set(orders) == {"ABBA", "BABA"}
    # ABC: same shape and positions, three distinct names none of which is the clean IO or S.
    assert abc.tokens.shape == clean.tokens.shape
    for role in pos:
        assert torch.equal(abc.positions[role], pos[role])
    names = abc.tokens[b[:, None], torch.stack([pos["IO"], pos["S1"], pos["S2"]], 1)]
    ids = zip(clean.answer_ids.tolist(), clean.wrong_ids.tolist(), strict=True)
    for row, (io, s) in zip(names.tolist(), ids, strict=True):
        assert len(set(row)) == 3 and io not in row and s not in row
    assert torch.equal(abc.answer_ids, clean.answer_ids)
    # Outside the three names the twins are the same sentence.
    same = abc.tokens == clean.tokens
    for role in ("IO", "S1", "S2"):
        same[b, pos[role]] = True
    assert bool(same.all())


def test_toy_vocabulary_prompts(toy_tokenizer):
    clean, abc = build_pair(toy_task(), toy_tokenizer, n=12, seed=3)
    check_ioi_invariants(clean, abc)
    assert clean.tokens[0, 0] == toy_tokenizer.bos_token_id
    assert clean.texts[0].split()[-1] == "to"


def test_paper_templates_in_a_bpe_tokenizer(smollm2):
    clean, abc = build_pair(paper_task(), smollm2.tokenizer, n=30, seed=0)
    check_ioi_invariants(clean, abc)
    assert len({m["template"] for m in clean.meta}) > 5
    assert all(t.endswith(" to") for t in clean.texts)


def test_fixed_seed_is_reproducible(toy_tokenizer):
    a, _ = build_pair(toy_task(), toy_tokenizer, n=6, seed=5)
    b, _ = build_pair(toy_task(), toy_tokenizer, n=6, seed=5)
    c, _ = build_pair(toy_task(), toy_tokenizer, n=6, seed=6)
    assert a.texts == b.texts and a.texts != c.texts


def test_multi_token_words_are_dropped_not_assumed(toy_tokenizer):
    task = IOITask(names=(*toy_task().names, "Zanzibarion"), templates=toy_task().templates,
                   places=toy_task().places, objects=toy_task().objects)  # fmt: skip
    assert "Zanzibarion" not in task.usable_words(toy_tokenizer)["names"]
    too_few = IOITask(names=("Mary", "John", "Xq"), templates=toy_task().templates,
                      places=toy_task().places, objects=toy_task().objects)  # fmt: skip
    with pytest.raises(TaskBuildError, match="single tokens"):
        too_few.build(toy_tokenizer, 4)


def test_template_restriction_and_subset(toy_tokenizer):
    clean, _ = build_pair(toy_task(), toy_tokenizer, n=8, seed=0, templates=[0])
    assert set(clean.groups.tolist()) == {0}
    sub = clean.subset([1, 3])
    assert sub.texts == [clean.texts[1], clean.texts[3]]
    assert sub.tokens.shape[1] == int(sub.end.max()) + 1


def test_metric_reads_the_answer_logits_at_end(toy_tokenizer):
    clean, _ = build_pair(toy_task(), toy_tokenizer, n=4, seed=0)
    logits = torch.zeros(4, clean.tokens.shape[1], len(toy_tokenizer))
    rows = torch.arange(4)
    logits[rows, clean.end, clean.answer_ids] = 3.0
    logits[rows, clean.end, clean.wrong_ids] = 1.0
    logits[0, clean.end[0], clean.wrong_ids[0]] = 5.0  # prompt 0 prefers S
    assert torch.allclose(clean.logit_diff(logits), torch.tensor([-2.0, 2.0, 2.0, 2.0]))
    assert clean.accuracy(logits) == 0.75


def test_paper_task_has_both_orders():
    assert paper_task().orders == ("ABBA", "BABA")
