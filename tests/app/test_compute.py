"""Model work of the explorer: one load per process, one forward pass per prompt and layer,
and the head views agree with each other and with the model's own modules."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app import compute
from tests.architectures.families import BY_NAME, build, prompt_ids, tokenizer
from workbench import figures
from workbench.capture import StreamedRecorder
from workbench.errors import RunMismatchError, WorkbenchError
from workbench.models import from_hf


def test_pool_loads_each_model_once_and_checks_its_identity(tiny_model) -> None:
    pool = compute.ModelPool(device="cpu")
    first = pool.get(tiny_model.info)
    assert pool.get(tiny_model.info) is first and pool.loads == 1
    other = dataclasses.replace(tiny_model.info, config_hash="0" * 16)
    with pytest.raises(RunMismatchError, match="config hash"):
        pool.get(other)


def test_pattern_and_streamed_positions_agree(tiny_model) -> None:
    ids = tiny_model.tokenize("when mary and john went to the store john gave a drink to mary")
    layer, head = 1, 3
    pattern = figures.head_pattern(tiny_model, ids, layer, head)  # [q_pos, k_pos]
    seen = []
    positions = compute.layer_positions(
        tiny_model, ids, layer, on_block=lambda i, n: seen.append((i, n))
    )[head]
    assert seen == [(0, 2), (1, 2)]
    np.testing.assert_allclose(positions.first_token_mass, pattern[:, 0], atol=1e-5)
    entropy = -(pattern * np.log(np.where(pattern > 0, pattern, 1))).sum(1)
    np.testing.assert_allclose(positions.entropy, entropy, atol=1e-4)
    np.testing.assert_allclose(positions.received, pattern.sum(0), atol=1e-4)
    np.testing.assert_array_equal(positions.argmax, pattern.argmax(1))
    np.testing.assert_allclose(positions.max_prob, pattern.max(1), atol=1e-5)
    assert positions.top_keys(1)[0][0] == int(
        np.argmax(pattern.sum(0) / np.arange(len(ids), 0, -1))
    )
    q, attended = positions.top_queries(1)[0]
    assert attended[0] == (int(pattern[q].argmax()), pytest.approx(pattern.max(), abs=1e-5))
    _assert_top_keys_of(positions, pattern, range(len(ids)))


def _assert_top_keys_of(positions, pattern: np.ndarray, queries) -> None:
    """The keys each query attends to most are the largest entries of its row of the eager
    pattern (a stable sort: equal weights in key order), with those weights; a query that sees
    fewer keys than TOP_KEYS has -1 / 0 padding."""
    for q in queries:
        row = pattern[q]
        order = np.argsort(-row, kind="stable")[: compute.TOP_KEYS]
        visible = int((row > 0).sum())
        want_keys = np.where(np.arange(compute.TOP_KEYS) < visible, order, -1)
        np.testing.assert_array_equal(positions.attended_keys[q], want_keys)
        np.testing.assert_allclose(positions.attended_weights[q], row[order] * (want_keys >= 0),
                                   atol=1e-5)  # fmt: skip
        assert positions.attended(q) == [
            (int(k), pytest.approx(float(row[k]), abs=1e-5)) for k in want_keys if k >= 0
        ]


def test_running_the_first_blocks_only_changes_nothing_for_them(tiny_model) -> None:
    ids = tiny_model.tokenize("the cat sat on the mat and the dog ran to the park")
    with torch.no_grad(), StreamedRecorder(tiny_model.hf, sink_size=1) as full:
        tiny_model.hf(ids[None])
    blocks = list(compute._blocks(tiny_model)[2])
    positions = compute.layer_positions(tiny_model, ids, 0)[2]
    np.testing.assert_allclose(positions.entropy, full.stats[0].entropy[0, 2].numpy(), atol=1e-6)
    assert list(compute._blocks(tiny_model)[2]) == blocks  # all blocks are back


def _hf_logit_attribution(model, ids: torch.Tensor, layer: int) -> np.ndarray:
    """Every head's direct logit attribution ``[head, seq, vocab]`` from the Hugging Face modules
    (o_proj's input and weight, the final RMSNorm's input, eps and weight, lm_head): an
    independent route to what the Head page computes on the TransformerLens bridge."""
    hf, info = model.hf, model.info
    attention = hf.model.layers[layer].self_attn
    kept = {}
    hooks = [
        attention.o_proj.register_forward_pre_hook(lambda m, a: kept.__setitem__("z", a[0])),
        hf.model.norm.register_forward_pre_hook(lambda m, a: kept.__setitem__("resid", a[0])),
    ]
    try:
        with torch.no_grad():
            hf(ids[None])
    finally:
        for hook in hooks:
            hook.remove()
    z = kept["z"][0].reshape(len(ids), info.n_heads, -1)  # [seq, head, d_head]
    w_o = attention.o_proj.weight.reshape(info.d_model, info.n_heads, -1)  # [d_model, head, d]
    out = torch.einsum("phd,mhd->hpm", z, w_o)  # [head, seq, d_model]
    resid = kept["resid"][0]  # [seq, d_model]
    norm = hf.model.norm
    scale = resid.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).rsqrt()
    return ((out * scale * norm.weight) @ hf.lm_head.weight.T).detach().numpy()


def test_what_a_head_writes_matches_the_models_own_modules(tiny_model) -> None:
    ids = tiny_model.tokenize("the cat sat on the mat and the dog ran to the park")
    layer = 1
    forward = compute.layer_forward(tiny_model, ids, layer)
    expected = _hf_logit_attribution(tiny_model, ids, layer)
    for head in range(tiny_model.info.n_heads):
        got = compute.logit_attribution(forward, head)  # [seq, vocab]
        np.testing.assert_allclose(got, expected[head], atol=1e-4, rtol=1e-4)
        pattern = figures.head_pattern(tiny_model, ids, layer, head)
        np.testing.assert_allclose(forward.pattern[head], pattern, atol=1e-6)
    assert forward.window == (0, len(ids))


def test_long_prompts_keep_only_a_window_of_pattern_rows(tiny_model) -> None:
    text = " ".join(["the cat sat on the mat and the dog ran to the park"] * 8)
    ids = tiny_model.tokenize(text)
    n = len(ids)
    assert n > compute.PATTERN_WINDOW
    forward = compute.layer_forward(tiny_model, ids, 0, window_start=10)
    assert forward.window == (10, 10 + compute.PATTERN_WINDOW)
    assert forward.pattern.shape == (tiny_model.info.n_heads, compute.PATTERN_WINDOW, n)
    full = figures.head_pattern(tiny_model, ids, 0, 2)  # [n, n]
    np.testing.assert_allclose(
        forward.pattern[2], full[10 : 10 + compute.PATTERN_WINDOW], atol=1e-6
    )
    # outside the window the page shows the kernels' top keys of each query: the full pattern's
    outside = [*range(10), *range(10 + compute.PATTERN_WINDOW, n)]
    _assert_top_keys_of(forward.positions[2], full, outside)


@given(n=st.integers(1, 5000), start=st.one_of(st.none(), st.integers(-100, 6000)))
def test_query_window_is_inside_the_prompt(n: int, start: int | None) -> None:
    lo, hi = compute.query_window(n, start)
    assert 0 <= lo < hi <= n
    assert hi - lo == min(n, compute.PATTERN_WINDOW)
    if n > compute.PATTERN_WINDOW and start is not None and 0 <= start <= n - hi + lo:
        assert lo == start  # a start that fits is kept as asked
    if start is None:
        assert hi == n  # by default the last rows, where a prompt's answer is read


def test_the_cache_reuses_a_forward_pass(tiny_model) -> None:
    cache = compute.ForwardCache(size=2)
    ids = tiny_model.tokenize("the cat sat on the mat")
    first, cached = cache.get(tiny_model, ids, 1)
    assert not cached and cache.misses == 1
    again, cached = cache.get(tiny_model, ids, 1)
    assert cached and again is first and cache.misses == 1
    cache.get(tiny_model, ids, 0)
    cache.get(tiny_model, tiny_model.tokenize("the dog ran"), 0)  # evicts the oldest
    _, cached = cache.get(tiny_model, ids, 1)
    assert not cached and cache.misses == 4


def test_toy_ioi_name_mover_writes_the_answer() -> None:
    """toy-ioi's card names 1.1 its name mover: on the task's prompts it pushes the indirect
    object over the subject at the last token."""
    import workbench

    model = workbench.load("toy-ioi", device="cpu")
    prompts = compute.task_prompts(model, "ioi-toy", n=8)
    assert len(prompts) == 8 and all(p.target is not None for p in prompts)
    shares = []
    for prompt in prompts:
        forward = compute.layer_forward(model, prompt.token_ids, 1)
        last = compute.logit_attribution(forward, 1)[-1]  # [vocab]
        shares.append(last[prompt.target] - last[prompt.foil])
    assert np.mean(shares) > 1.0 and np.mean(np.asarray(shares) > 0) >= 0.75


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_received_rate_divides_by_the_queries_that_see_each_key(family) -> None:
    """The received rate is a key's column sum over the queries that can see it: N - k on a
    global causal layer, at most the window on a local one (Mistral, window 8 at 48 tokens);
    checked against the eager pattern's own column sums and visible counts."""
    hf = build(BY_NAME[family])
    model = from_hf(hf, tokenizer(), name=f"matrix-{family}")
    ids = prompt_ids()[0]
    with torch.no_grad():
        pattern = hf(ids[None], output_attentions=True).attentions[0][0]  # [head, q, k]
    seen = (pattern > 0).any(0).sum(0).float()  # [k] queries that see key k
    for head, position in enumerate(compute.layer_positions(model, ids, 0)):
        expected = (pattern[head].sum(0) / seen).numpy()
        np.testing.assert_allclose(position.received_rate, expected, atol=1e-5)


def _pattern_values(pattern: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-position statistic straight from an eager pattern [q, k] of a causal head: the
    independent route to PositionStats.values (NaN where a query sees one key or a key is seen
    by one query)."""
    n = len(pattern)
    visible = np.arange(1, n + 1)  # causal: query i sees keys 0..i
    seen_by = np.arange(n, 0, -1)  # key k is seen by queries k..n-1
    entropy = -(pattern * np.log(np.where(pattern > 0, pattern, 1))).sum(1)
    per_query = {
        "first_token_mass": pattern[:, 0],
        "max_prob": pattern.max(1),
        "entropy": entropy,
        "normalized_entropy": entropy / np.log(np.maximum(visible, 2)),
    }
    values = {name: np.where(visible >= 2, v, np.nan) for name, v in per_query.items()}
    values["received_rate"] = np.where(seen_by >= 2, pattern.sum(0) / seen_by, np.nan)
    return values


def test_position_values_are_the_patterns(tiny_model) -> None:
    ids = tiny_model.tokenize("when mary and john went to the store john gave a drink to mary")
    stats = compute.layer_positions(tiny_model, ids, 1)
    for head in range(tiny_model.info.n_heads):
        expected = _pattern_values(figures.head_pattern(tiny_model, ids, 1, head))
        for name in compute.POSITION_STATISTICS:
            np.testing.assert_allclose(stats[head].values(name), expected[name], atol=1e-4,
                                       err_msg=name)  # fmt: skip
    with pytest.raises(WorkbenchError, match="no per-position statistic 'sink'; choose one of"):
        stats[0].values("sink")


SURVEY_TEXTS = [
    "the cat sat on the mat",
    "when mary and john went to the store john gave a drink to mary",
    "the dog ran to the park",
]


def test_top_positions_rank_every_position_of_every_prompt(tiny_model) -> None:
    """Against a brute force over the eager patterns of every prompt: the ranked values are the
    largest of all positions', and each is the value at the (prompt, position) it names."""
    prompts = [
        compute.SurveyPrompt("scan:basic", i, tiny_model.tokenize(text))
        for i, text in enumerate(SURVEY_TEXTS)
    ]
    seen = []
    survey = compute.survey_layer(tiny_model, prompts, 1, on_prompt=lambda i, n: seen.append(i))
    assert seen == [0, 1, 2] and len(survey.positions) == 3
    for head, statistic in [(0, "max_prob"), (3, "first_token_mass"), (2, "received_rate")]:
        by_prompt = [
            _pattern_values(figures.head_pattern(tiny_model, p.token_ids, 1, head))[statistic]
            for p in prompts
        ]
        everything = np.sort(np.concatenate(by_prompt)[~np.isnan(np.concatenate(by_prompt))])
        ranked = compute.top_positions(survey, head, statistic, 7)
        np.testing.assert_allclose([r.value for r in ranked], everything[::-1][:7], atol=1e-4)
        for r in ranked:
            assert r.value == pytest.approx(by_prompt[r.prompt][r.position], abs=1e-4)


def _stats(values: np.ndarray, visible: np.ndarray) -> compute.PositionStats:
    n = len(values)
    zeros = np.zeros(n)
    keys = np.zeros((n, compute.TOP_KEYS), dtype=np.int64)
    return compute.PositionStats(values, zeros, keys, keys.astype(float), zeros, zeros, visible,
                                 np.full(n, 2))  # fmt: skip


@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from([0.0, 0.25, 0.5, 1.0, np.nan]), st.integers(1, 3)),
            max_size=6,
        ),
        max_size=4,
    ),
    st.integers(0, 10),
)
def test_top_positions_order_and_ties(prompts: list, n: int) -> None:
    """Highest first; equal values keep the earlier prompt, then the earlier position; NaN and
    single-key queries are never ranked; at most n."""
    survey = compute.Survey(
        0,
        [compute.SurveyPrompt("scan:basic", i, torch.zeros(len(p))) for i, p in enumerate(prompts)],
        [[_stats(np.array([v for v, _ in p]), np.array([k for _, k in p]))] for p in prompts],
    )
    ranked = compute.top_positions(survey, 0, "first_token_mass", n)
    candidates = [
        (-v, i, j) for i, p in enumerate(prompts) for j, (v, k) in enumerate(p) if k >= 2 and v == v
    ]
    expected = sorted(candidates)[:n]
    assert [(-r.value, r.prompt, r.position) for r in ranked] == expected


def test_the_survey_cache_reuses_a_layer(tiny_model) -> None:
    cache = compute.SurveyCache(size=1)
    prompts = [compute.SurveyPrompt("typed", 0, tiny_model.tokenize("the cat sat"))]
    first, cached = cache.get(tiny_model, prompts, 0)
    again, cached_again = cache.get(tiny_model, prompts, 0)
    assert (cached, cached_again, cache.misses) == (False, True, 1) and again is first
    cache.get(tiny_model, prompts, 1)  # another layer: evicts the first (size 1)
    assert not cache.get(tiny_model, prompts, 0)[1] and cache.misses == 3


@pytest.mark.parametrize(
    ("cores", "pool", "omp", "threads"),
    [(2, 2, None, 1), (16, 16, None, 15), (1, 1, None, 1), (8, 4, None, 4), (2, 2, "2", 2)],
)
def test_server_threads_examples(cores: int, pool: int, omp: str | None, threads: int) -> None:
    assert compute.server_threads(cores, pool, omp) == threads


@given(
    cores=st.integers(1, 512),
    pool=st.integers(1, 512),
    omp=st.one_of(st.none(), st.sampled_from(["", " ", "1", "3", "64"])),
)
def test_server_threads_leave_a_core_to_the_server(cores: int, pool: int, omp) -> None:
    """Never more threads than PyTorch's pool nor than the cores but one (at least one), the
    most that allows; OMP_NUM_THREADS, when set, keeps PyTorch's own choice."""
    threads = compute.server_threads(cores, pool, omp)
    if omp and omp.strip():
        assert threads == pool
    else:
        assert 1 <= threads <= pool and (threads <= cores - 1 or threads == 1)
        assert threads == pool or threads == max(1, cores - 1)


def test_the_server_applies_its_threads(monkeypatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        threads = compute.use_server_threads()
        assert torch.get_num_threads() == threads
        assert threads == compute.server_threads(len(os.sched_getaffinity(0)), before, None)
    finally:
        torch.set_num_threads(before)
