import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from workbench import kv_policy
from workbench.cli import main
from workbench.errors import ShapeError
from workbench.scores import ScoreTable
from workbench.kv_policy import CachePolicy, evaluate_map, random_map
from workbench.store import RunWriter
from workbench.tasks.needle import NeedleTrial

SINK, WINDOW = 2, 5
KV_FULL = np.array([[True, False], [False, True]])  # tiny model: 2 layers x 2 KV heads


def dense_policy_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Reference: the policy as an explicit [head, L, L] mask (fine at test lengths)."""
    n = query.shape[2]
    group = query.shape[1] // key.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    causal = j <= i
    window = causal & ((j < SINK) | (j > i - WINDOW))
    full = torch.as_tensor(KV_FULL[module.layer_idx]).repeat_interleave(group)  # [n_heads]
    mask = torch.where(full[:, None, None], causal, window)  # [head, q_pos, k_pos]
    output = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(group, 1),
        value.repeat_interleave(group, 1),
        attn_mask=mask[None],
        scale=scaling,
    )
    return output.transpose(1, 2).contiguous(), None


@torch.no_grad()
def test_policy_attention_matches_dense_masks_in_prefill_and_decoding(tiny_model, monkeypatch):
    hf = tiny_model.hf
    ids = torch.randint(3, 35, (1, 40), generator=torch.Generator().manual_seed(0))
    plain = hf(ids).logits
    with CachePolicy(np.ones((2, 2), bool), SINK, WINDOW).applied(hf):
        torch.testing.assert_close(hf(ids).logits, plain)  # all full = the unmodified model
    assert hf.config._attn_implementation != kv_policy.SERVING_NAME  # restored on exit

    monkeypatch.setattr(kv_policy, "BLOCK", 7)  # several query blocks at 40 tokens
    AttentionInterface.register("dense_policy_test", dense_policy_attention)
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("dense_policy_test")
    try:
        expected = hf(ids).logits  # [1, seq, vocab]
    finally:
        hf.set_attn_implementation(previous)
    policy = CachePolicy(KV_FULL, SINK, WINDOW)
    with policy.applied(hf):
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-5, rtol=1e-5)
        out = hf(ids[:, :30], use_cache=True)
        steps = [out.logits[0, -1]]
        for t in range(30, 39):  # decoding with a cache sees the same keys as the prefill did
            out = hf(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), expected[0, 29:39], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the windows did cut something


def test_kv_share_random_maps_and_shape_checks(tiny_model):
    policy = CachePolicy(KV_FULL, sink_size=4, recent_size=16)
    assert policy.full_fraction == 0.5
    assert policy.kv_kept(100) == pytest.approx(0.5 + 0.5 * 20 / 100)
    assert policy.kv_kept(10) == 1.0  # the window covers the whole sequence
    first, again = random_map((30, 3), 9, seed=1), random_map((30, 3), 9, seed=1)
    assert first.sum() == 9 and np.array_equal(first, again)
    assert not np.array_equal(first, random_map((30, 3), 9, seed=2))
    with pytest.raises(ShapeError, match="was the map made for another model"):
        CachePolicy(np.ones((3, 2), bool)).applied(tiny_model.hf)
    with pytest.raises(ShapeError, match=r"the model's KV heads \(2, 2\)"):
        evaluate_map(tiny_model, {"bad": np.ones((2, 3), bool)}, [])


def test_evaluate_map_rows(tiny_model):
    # a trial in the tiny model's vocabulary: "the cat" ... needle "mary gave" ... answer "gave"
    vocab = tiny_model.tokenizer.get_vocab()
    words = ["the", "cat", "sat", "on", "mat"] * 6 + ["mary", "gave"] + ["the", "dog"] * 4
    ids = np.array([vocab["<bos>"], *(vocab[w] for w in words), vocab["mary"]])
    trial = NeedleTrial(
        token_ids=ids,
        needle_span=(31, 33),
        answer_span=(32, 33),
        answer_ids=np.array([vocab["gave"]]),
        answer="gave",
        question="mary",
        length=len(ids),
        depth=0.75,
        needle_index=-1,
        seed=0,
    )
    frame = evaluate_map(
        tiny_model, {"map": KV_FULL}, [trial], sink_size=1, recent_size=4, max_new_tokens=2
    )
    assert list(frame["kind"]) == ["baseline", "baseline", "map", "random"]
    streaming = frame[frame["policy"] == "streaming only"].iloc[0]
    assert streaming["kv_kept"] == pytest.approx(5 / len(ids), abs=1e-4)
    assert frame[frame["policy"] == "full"].iloc[0]["kv_kept"] == 1.0
    assert (frame["full_kv_heads"] == [0, 4, 2, 2]).all() and (frame["trials"] == 1).all()
    assert frame["accuracy"].between(0, 1).all()


def test_cli_evaluate_map(tiny_model, tiny_llama_dir, tiny_llama_factory, tmp_path, capsys):
    scores = np.array([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0]])  # KV heads (0, 0), (1, 1)
    writer = RunWriter(tmp_path / "run.h5", tiny_model.info, {})
    writer.write_score(ScoreTable("retrieval", scores, "Wu et al.", 0.1, "retrieval"))
    run = writer.finish()
    out = tmp_path / "eval.json"
    argv = ["evaluate-map", str(run), "--model", str(tiny_llama_dir), "--lengths", "60"]
    argv += ["--depths", "0.2", "--needles", "1", "--max-new", "2", "--recent-size", "8"]
    assert main([*argv, "--full-fractions", "0.25,0.5", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "retrieval > 0.1 (max over KV group)" in printed and "streaming only" in printed
    document = json.loads(out.read_text())
    assert document["task"] == "prose" and document["settings"]["recent_size"] == 8
    # maps: threshold (= top 0.5, listed once) and top 0.25; each with a random twin; 2 baselines
    assert len(document["rows"]) == 6 and "CPU" in document["machine"]
    assert {r["full_kv_heads"] for r in document["rows"]} == {0, 1, 2, 4}
    assert main([*argv, "--full-fractions", "2"]) == 2
    assert "full fraction must be in [0, 1]" in capsys.readouterr().err
    other = tiny_llama_factory(tmp_path / "other", n_kv_heads=4)
    assert main([*argv[:2], "--model", str(other)]) == 2
    message = capsys.readouterr().err
    assert "was made with tiny-llama (" in message and "not with other (" in message
