"""The KV-cache policy simulation (workbench/kv_policy.py) against dense references built here.

Two references, both written from the policy's definition (the kv_policy module docstring) and
independent of the workbench's blockwise code:

* a whole model: the model family's own ``eager_attention_forward`` with transformers' own
  materialised mask (``eager_mask``: causal, local window or chunks) plus the policy's evictions
  as ``-inf``; one forward without a cache gives every position's logits, which the policy must
  reproduce when it runs as a client does (prefill, question as one forward, then one decoded
  token per forward): each query's keys depend only on its position and the prefill's length;
* one attention call: a dense softmax over explicit [head, q, k] masks, with softcap and learned
  sinks written out, checked on generated layer shapes and options (hypothesis).
"""

import json
import sys
from contextvars import ContextVar
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tests.architectures.families import BY_NAME, build, prompt_ids
from workbench import kv_policy
from workbench.capture.attention import AttentionCall
from workbench.cli import build_parser, main
from workbench.errors import CaptureError, ShapeError, WorkbenchError
from workbench.kv_policy import (
    PREFILL_POLICIES,
    CachePolicy,
    evaluate_map,
    policy_attention,
    random_map,
)
from workbench.scores import ScoreTable
from workbench.store import RunWriter
from workbench.tasks.needle import NeedleTrial, make_trial, toy_recall_grid

SINK, RECENT = 2, 5  # RECENT < the families' windows and chunks of 8: evictions inside them
KV_FULL = np.array([[True, False], [False, True]])  # tiny model: 2 layers x 2 KV heads
LENGTH, CONTEXT, QUESTION_END = 40, 24, 30  # prefill 0..23, question 24..29, decode 30..39
REFERENCE = "kv_policy_dense_reference"


def kept(p, j, prefill, context, sink=SINK, recent=RECENT):
    """Whether a streaming head's query at position ``p`` keeps key ``j`` (broadcast bool), after
    a prefill of ``context`` tokens."""
    if prefill == "exact":  # exact prefill, then the cache cut to sinks + the prefill's last keys
        return (p < context) | (j < sink) | (j >= context - recent)
    return (j < sink) | (j > p - recent)


# ---------------------------------------------------------------------------------------------
# Whole models: the family's own eager attention with the evictions added to its mask

_SPEC: ContextVar[tuple[np.ndarray, str] | None] = ContextVar(REFERENCE, default=None)


def reference_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention; streaming heads (``_SPEC``'s map) lose the keys the
    policy evicts (an additive ``-inf``), on top of the model's own additive mask."""
    kv_full, prefill = _SPEC.get()
    q_len, k_len = query.shape[2], key.shape[2]
    assert q_len == k_len, "the reference runs one forward without a cache"
    p, j = torch.arange(k_len)[:, None], torch.arange(k_len)[None]
    group = query.shape[1] // key.shape[1]
    full = torch.as_tensor(kv_full[module.layer_idx]).repeat_interleave(group)  # [n_heads]
    evicted = ~full[:, None, None] & ~kept(p, j, prefill, CONTEXT)  # [head, q_pos, k_pos]
    bias = torch.zeros(evicted.shape).masked_fill(evicted, float("-inf"))[None]
    own_eager = sys.modules[type(module).__module__].eager_attention_forward
    return own_eager(module, query, key, value, attention_mask + bias, **kwargs)


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, eager_mask)


@torch.no_grad()
def reference_logits(hf, ids, kv_full, prefill):
    """``[LENGTH, vocab]`` logits of one cacheless forward of the reference."""
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(REFERENCE)
    token = _SPEC.set((kv_full, prefill))
    try:
        return hf(ids).logits[0]
    finally:
        _SPEC.reset(token)
        hf.set_attn_implementation(previous)


@torch.no_grad()
def client_logits(hf, ids, policy):
    """``[LENGTH, vocab]`` logits under ``policy`` as a serving client runs the sequence: the
    prefill (CONTEXT tokens), the question as one forward, then one token per forward."""
    cache = DynamicCache()
    with policy.applied(hf):
        parts = [hf(ids[:, :CONTEXT], past_key_values=cache, use_cache=True).logits]
        parts.append(hf(ids[:, CONTEXT:QUESTION_END], past_key_values=cache).logits)
        for t in range(QUESTION_END, ids.shape[1]):
            parts.append(hf(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(parts, dim=1)[0]


def family_model(name):
    """A matrix family's tiny model, its ids and a mixed map (every other KV head full)."""
    hf = build(BY_NAME[name])
    text = hf.config.get_text_config()
    layers, kv_heads = np.indices((text.num_hidden_layers, text.num_key_value_heads))
    return hf, prompt_ids(seq_len=LENGTH), (layers + kv_heads) % 2 == 0


@pytest.mark.parametrize("prefill", PREFILL_POLICIES)
@pytest.mark.parametrize(
    "name",
    [
        "tiny-llama",  # plain causal layers (SDPA blocks)
        "gpt-oss",  # learned sink logits, window 8 / global
        "gemma2",  # attention softcap 5, window 8 / global
        "llama4",  # chunks of 8 on RoPE layers, global NoPE layer
    ],
)
def test_policy_matches_dense_reference_in_prefill_question_and_decoding(
    name, prefill, tiny_model, monkeypatch
):
    if name == "tiny-llama":
        hf, kv_full = tiny_model.hf, KV_FULL
        ids = torch.randint(3, 35, (1, LENGTH), generator=torch.Generator().manual_seed(0))
        atol = 1e-5
    else:
        hf, ids, kv_full = family_model(name)
        atol = 1e-4
    with torch.no_grad():
        plain = hf(ids).logits[0]  # [LENGTH, vocab], the unmodified model
    monkeypatch.setattr(kv_policy, "BLOCK", 7)  # several query blocks in the prefill
    all_full = CachePolicy(np.ones(kv_full.shape, bool), SINK, RECENT, prefill)
    torch.testing.assert_close(client_logits(hf, ids, all_full), plain, atol=atol, rtol=0)
    assert hf.config._attn_implementation != kv_policy.SERVING_NAME  # restored on exit

    want = reference_logits(hf, ids, kv_full, prefill)
    got = client_logits(hf, ids, CachePolicy(kv_full, SINK, RECENT, prefill))
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    evicted = (want - plain).abs().amax(-1)  # [LENGTH]
    # no query before SINK + RECENT loses a key; an exact prefill loses none before CONTEXT
    unchanged = CONTEXT if prefill == "exact" else SINK + RECENT
    assert evicted[:unchanged].max() < atol
    assert evicted[unchanged:].min() > 1e-3, "the policy evicted nothing from a query on"


def test_a_cache_that_drops_keys_is_refused():
    """transformers' default cache for a sliding-window model keeps only the window of its local
    layers, so cache index and position part; the simulation refuses it, not answers wrong."""
    hf, ids, kv_full = family_model("mistral")
    with torch.no_grad(), CachePolicy(kv_full, SINK, RECENT).applied(hf):
        cache = DynamicCache(config=hf.config)  # what hf(..., use_cache=True) builds itself
        hf(ids[:, :CONTEXT], past_key_values=cache)
        with pytest.raises(CaptureError, match="did not grow from this policy's last call"):
            hf(ids[:, CONTEXT : CONTEXT + 1], past_key_values=cache)
    with torch.no_grad(), CachePolicy(kv_full, SINK, RECENT, "exact").applied(hf):
        cache = DynamicCache()
        hf(ids[:, :4], past_key_values=cache)
        cache.crop(-2)  # a cache cut below what the policy saw
        with pytest.raises(CaptureError, match="from a prefill under the policy"):
            hf(ids[:, 2:3], past_key_values=cache)


# ---------------------------------------------------------------------------------------------
# One attention call against an explicit dense mask, on generated shapes and options


def dense_call(query, key, value, full, policy, window, chunk, softcap, sinks, scale):
    """``[1, n_heads, k_len, d_v]``: every position's output, the policy's definition written
    out over a ``[head, k, k]`` mask; ``policy``: ``(prefill, context, sink, recent)``."""
    k_len = key.shape[2]
    group = query.shape[1] // key.shape[1]
    p, j = torch.arange(k_len)[:, None], torch.arange(k_len)[None]
    model = j <= p
    if window is not None:
        model &= j > p - window
    if chunk is not None:
        model &= j // chunk == p // chunk
    heads_full = full.repeat_interleave(group)[:, None, None]  # [head, 1, 1]
    mask = model & (heads_full | kept(p, j, *policy))  # [head, q, k]
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ k.transpose(-1, -2) * scale  # [1, head, q, k]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[None, :, None, None].expand(1, -1, k_len, 1)], -1)
    return scores.softmax(-1)[..., :k_len] @ v


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    full=st.lists(st.booleans(), min_size=2, max_size=2),
    group=st.integers(1, 3),
    context=st.integers(1, 20),
    later=st.integers(0, 6),
    mask=st.one_of(
        st.none(), st.tuples(st.just("window"), st.integers(1, 12)),
        st.tuples(st.just("chunk"), st.integers(1, 12)),
    ),
    softcap=st.one_of(st.none(), st.floats(0.5, 10)),
    learned_sinks=st.booleans(),
    sink=st.integers(0, 4),
    recent=st.integers(1, 8),
    prefill=st.sampled_from(PREFILL_POLICIES),
    block=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_policy_attention_equals_dense_masks(
    tiny_model, full, group, context, later, mask, softcap, learned_sinks, sink, recent, prefill,
    block, seed,
):  # fmt: skip
    """A prefill of ``context`` keys, then ``later`` queries in one call, each against the dense
    definition; layer 0 of a map ``[full, full]``."""
    generator = torch.Generator().manual_seed(seed)
    k_len, n_kv, scale = context + later, 2, 0.7
    query = torch.randn(1, n_kv * group, k_len, 4, generator=generator) * 2
    key, value = (torch.randn(1, n_kv, k_len, 4, generator=generator) * 2 for _ in range(2))
    sinks = torch.randn(n_kv * group, generator=generator) if learned_sinks else None
    window, chunk = (None, None) if mask is None else (
        (mask[1], None) if mask[0] == "window" else (None, mask[1])
    )  # fmt: skip
    full = torch.tensor(full)
    want = dense_call(query, key, value, full, (prefill, context, sink, recent), window, chunk,
                      softcap, sinks, scale)  # fmt: skip
    policy = CachePolicy(np.stack([full.numpy()] * 2), sink, recent, prefill)

    def call(rows: slice, keys: int) -> torch.Tensor:
        return policy_attention(AttentionCall(
            module=torch.nn.Identity(), layer=0, query=query[:, :, rows], key=key[:, :, :keys],
            value=value[:, :, :keys], causal=True, scale=scale, window=window, chunk=chunk,
            softcap=softcap, sinks=sinks,
        ))  # fmt: skip

    with mock.patch.object(kv_policy, "BLOCK", block), policy.applied(tiny_model.hf):
        got = [call(slice(0, context), context)]
        if later:
            got.append(call(slice(context, k_len), k_len))
    torch.testing.assert_close(torch.cat(got, dim=2), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Options, KV share, maps


@settings(max_examples=60, deadline=None, derandomize=True)
@given(prefill=st.one_of(st.text(max_size=10), st.integers(), st.none()))
def test_only_the_named_prefill_policies_are_taken(prefill):
    if prefill in PREFILL_POLICIES:
        assert CachePolicy(KV_FULL, prefill=prefill).prefill == prefill
        assert build_parser().parse_args(["evaluate-map", "run.h5", "--prefill", prefill])
        return
    with pytest.raises(CaptureError, match="prefill must be one of exact, streamed"):
        CachePolicy(KV_FULL, prefill=prefill)
    with pytest.raises(WorkbenchError):
        evaluate_map(None, {}, [], prefill=prefill)
    if isinstance(prefill, str):
        with pytest.raises(SystemExit) as exited:  # argparse's choices: usage + exit 2
            build_parser().parse_args(["evaluate-map", "run.h5", "--prefill", prefill])
        assert exited.value.code == 2


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    sink=st.one_of(st.integers(-3, 6), st.booleans(), st.floats(0, 4)),
    recent=st.one_of(st.integers(-3, 6), st.booleans(), st.floats(0, 4)),
)
def test_sink_and_recent_sizes_are_checked(sink, recent):
    valid = all(type(n) is int for n in (sink, recent)) and sink >= 0 and recent >= 1
    if valid:
        policy = CachePolicy(KV_FULL, sink, recent)
        assert policy.kv_kept(sink + recent) == 1.0  # nothing to evict yet
        return
    with pytest.raises(CaptureError):  # a ValueError and a WorkbenchError
        CachePolicy(KV_FULL, sink, recent)


def test_kv_share_random_maps_and_shape_checks(tiny_model):
    policy = CachePolicy(KV_FULL, sink_size=4, recent_size=16)
    assert policy.full_fraction == 0.5
    assert policy.kv_kept(100) == pytest.approx(0.5 + 0.5 * 20 / 100)
    assert policy.kv_kept(100, context=80) == policy.kv_kept(100)  # streamed: context unused
    assert policy.kv_kept(10) == 1.0  # the window covers the whole sequence
    exact = CachePolicy(KV_FULL, sink_size=4, recent_size=16, prefill="exact")
    # 20 of the 80 prefill keys, and the 20 question keys after the compression
    assert exact.kv_kept(100, context=80) == pytest.approx(0.5 + 0.5 * 40 / 100)
    first, again = random_map((30, 3), 9, seed=1), random_map((30, 3), 9, seed=1)
    assert first.sum() == 9 and np.array_equal(first, again)
    assert not np.array_equal(first, random_map((30, 3), 9, seed=2))
    with pytest.raises(ShapeError, match="was the map made for another model"):
        CachePolicy(np.ones((3, 2), bool)).applied(tiny_model.hf)
    with pytest.raises(ShapeError, match=r"the model's KV heads \(2, 2\)"):
        evaluate_map(tiny_model, {"bad": np.ones((2, 3), bool)}, [])


def test_trials_mark_where_their_question_starts(tiny_model):
    for trial in toy_recall_grid([20], [0.5], 2):
        assert trial.question_start == len(trial.token_ids) - 2  # <q> k
    trial = make_trial(tiny_model.tokenizer, 120, 0.5)
    question = tiny_model.tokenizer(
        "\nBased on the content of the book, Question: " + trial.question + "\nAnswer:",
        add_special_tokens=False,
    )["input_ids"]
    assert trial.token_ids[trial.question_start :].tolist() == question
    assert trial.needle_span[1] <= trial.question_start


def needle_trial(tiny_model, question_start=-1):
    # a trial in the tiny model's vocabulary: "the cat" ... needle "mary gave" ... answer "gave"
    vocab = tiny_model.tokenizer.get_vocab()
    words = ["the", "cat", "sat", "on", "mat"] * 6 + ["mary", "gave"] + ["the", "dog"] * 4
    ids = np.array([vocab["<bos>"], *(vocab[w] for w in words), vocab["mary"]])
    return NeedleTrial(
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
        question_start=None if question_start is None else len(ids) + question_start,
    )


@pytest.mark.parametrize("prefill", PREFILL_POLICIES)
def test_evaluate_map_rows(tiny_model, prefill):
    trial = needle_trial(tiny_model)
    frame = evaluate_map(
        tiny_model, {"map": KV_FULL}, [trial], sink_size=1, recent_size=4, max_new_tokens=2,
        prefill=prefill,
    )  # fmt: skip
    assert list(frame["kind"]) == ["baseline", "baseline", "map", "random"]
    assert (frame["prefill"] == prefill).all()
    streaming = frame[frame["policy"] == "streaming only"].iloc[0]
    kept = 5 if prefill == "streamed" else 5 + 1  # exact: the question's token stays too
    assert streaming["kv_kept"] == pytest.approx(kept / len(trial.token_ids), abs=1e-4)
    assert frame[frame["policy"] == "full"].iloc[0]["kv_kept"] == 1.0
    assert (frame["full_kv_heads"] == [0, 4, 2, 2]).all() and (frame["trials"] == 1).all()
    assert frame["accuracy"].between(0, 1).all()


def test_evaluate_map_draws_one_random_map_per_seed(tiny_model):
    trial = needle_trial(tiny_model)
    options = dict(sink_size=1, recent_size=4, max_new_tokens=2)
    frame = evaluate_map(tiny_model, {"map": KV_FULL}, [trial], random_seed=[3, 5], **options)
    randoms = frame[frame["kind"] == "random"].set_index("policy")
    assert list(randoms.index) == ["random (2 KV heads, seed 3)", "random (2 KV heads, seed 5)"]
    # each random row is that seed's random_map, run as a map of its own
    for seed in (3, 5):
        alone = evaluate_map(
            tiny_model, {"drawn": random_map(KV_FULL.shape, 2, seed)}, [trial], **options
        )
        want = alone[alone["policy"] == "drawn"].iloc[0]
        got = randoms.loc[f"random (2 KV heads, seed {seed})"]
        for column in ("full_kv_heads", "kv_kept", "accuracy", "mean_recall"):
            assert got[column] == want[column], column
    with pytest.raises(CaptureError, match="non-empty list of seeds"):
        evaluate_map(tiny_model, {"map": KV_FULL}, [trial], random_seed=[])


def test_exact_prefill_needs_the_question_start(tiny_model):
    trial = needle_trial(tiny_model, question_start=None)
    with pytest.raises(CaptureError, match="trial 0 does not mark where its question starts"):
        evaluate_map(tiny_model, {}, [trial], prefill="exact")


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
    assert {r["prefill"] for r in document["rows"]} == {"streamed"}
    exact = [*argv, "--prefill", "exact", "--out", str(out), "--quiet"]
    assert main(exact) == 0
    document = json.loads(out.read_text())
    assert document["settings"]["prefill"] == "exact"
    assert {r["prefill"] for r in document["rows"]} == {"exact"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before any work
        main([*argv, "--full-fractions", "2"])
    assert stop.value.code == 2
    assert "--full-fractions: expected a comma list of finite numbers in [0, 1]" in (
        capsys.readouterr().err
    )
    other = tiny_llama_factory(tmp_path / "other", n_kv_heads=4)
    assert main([*argv[:2], "--model", str(other)]) == 2
    message = capsys.readouterr().err
    assert "was made with tiny-llama (" in message and "not with other (" in message
