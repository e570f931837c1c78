import numpy as np
import pytest

from workbench.tasks.needle import NEEDLES, make_trial, needle_grid, toy_recall_grid


def test_trial_spans_hold_the_needle_and_answer(smollm2):
    tokenizer = smollm2.tokenizer
    for depth in (0.0, 0.3, 1.0):
        trial = make_trial(tokenizer, 300, depth, needle=0, seed=3)
        assert len(trial.token_ids) == 300
        s, e = trial.needle_span
        a, b = trial.answer_span
        assert s <= a < b <= e
        np.testing.assert_array_equal(trial.token_ids[a:b], trial.answer_ids)
        assert tokenizer.decode(trial.token_ids[s:e]).strip() == NEEDLES[0].sentence.strip()
        assert tokenizer.decode(trial.answer_ids).strip() == trial.answer
        assert tokenizer.decode(trial.token_ids[-12:]).endswith("in Beijing?\nAnswer:")
        if 0.0 < depth < 1.0:  # inserted after a sentence end, at or before the requested depth
            assert tokenizer.decode(trial.token_ids[s - 1 : s]).rstrip().endswith((".", "!", "?"))
            assert 0.0 < trial.depth_actual <= depth
    assert make_trial(tokenizer, 300, 0.0).needle_span[0] == 0  # no BOS in front for SmolLM2
    tail = make_trial(tokenizer, 300, 1.0)
    assert tail.needle_span[1] + len(tokenizer("\nBased on")["input_ids"]) <= 300


def test_grid_is_deterministic_and_checks_arguments(smollm2):
    tokenizer = smollm2.tokenizer
    grid = needle_grid(tokenizer, [200, 260], [0.0, 0.5], needles=2, seed=5)
    assert len(grid) == 8
    assert [(t.length, t.depth, t.needle_index) for t in grid[:3]] == [
        (200, 0.0, 0),
        (200, 0.0, 1),
        (200, 0.5, 0),
    ]
    again = needle_grid(tokenizer, [200, 260], [0.0, 0.5], needles=2, seed=5)
    assert all(np.array_equal(x.token_ids, y.token_ids) for x, y in zip(grid, again, strict=True))
    assert not np.array_equal(grid[0].token_ids, grid[4].token_ids)  # haystacks differ by seed
    with pytest.raises(ValueError, match="depth must lie in"):
        make_trial(tokenizer, 300, 1.5)
    with pytest.raises(ValueError, match="shorter than the needle"):
        make_trial(tokenizer, 20, 0.5)


def test_toy_recall_trials():
    trials = toy_recall_grid([24, 53], [0.0, 0.5, 1.0], n_per_cell=2, seed=1)
    assert len(trials) == 12
    for t in trials:
        assert len(t.token_ids) == t.length and t.token_ids[0] == 0  # <bos>
        key, value = t.token_ids[t.needle_span[0] : t.needle_span[1]]
        assert t.token_ids[-1] == key and t.answer_ids.tolist() == [value]
        assert (t.token_ids == value).sum() == 1 and (t.token_ids == key).sum() == 2
        assert t.answer_span == (t.needle_span[0] + 1, t.needle_span[1])
        assert t.needle_span[0] % 2 == 1  # on the aligned pair slots the model was trained on
    assert trials[0].needle_span[0] == 1 and trials[4].needle_span[1] == 21
    with pytest.raises(ValueError, match="toy-recall trials take lengths"):
        toy_recall_grid([80], [0.5])
