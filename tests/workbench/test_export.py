"""Serving export: the formats, each read back through its consumer's own loading code.

The consumers' loaders are not installable next to the workbench (kvpress pins transformers < 5.3;
DuoAttention, MoA and golden-stick are not packaged for it), so the functions below repeat, line
for line, the parts of their code that read our files and turn them into a selection; the citation
is beside each. tests/clients/test_kvpress.py runs kvpress itself on an exported directory.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from workbench.cli import build_parser, main
from workbench.export import FORMATS, export, normalised_scores, select_full
from workbench.headmap import HeadMap, HeadMapError, Policy
from workbench.models import ModelInfo
from workbench.scores import ScoreTable
from workbench.store import RunWriter, open_run

# [n_layers=2, n_heads=4]; KV groups (0,1) and (2,3)
RETRIEVAL = np.array([[0.05, 0.30, 0.00, 0.02], [0.00, 0.00, 0.12, 0.50]], dtype=np.float32)
TRIALS = np.stack([RETRIEVAL * 2, np.full_like(RETRIEVAL, np.nan), np.zeros_like(RETRIEVAL)])


@pytest.fixture
def run_path(tmp_path, tiny_model):
    writer = RunWriter(tmp_path / "run.h5", tiny_model.info, {})
    ids = [np.arange(3)] * 3
    group = writer.measurement("needles", ["a", "b", "c"], ids, {"retrieval": "per trial"})
    group.write(0, [{"retrieval": t} for t in TRIALS])
    writer.write_score(
        ScoreTable(
            "retrieval", RETRIEVAL, "Wu et al.", 0.1, "retrieval", {"per_item": "needles/retrieval"}
        )
    )
    writer.write_score(ScoreTable("sink", 1 - RETRIEVAL, "Gu et al.", 0.3, "sink"))
    writer.write_score(ScoreTable("entropy", RETRIEVAL / 2, "Guo et al."))
    return writer.finish()


@pytest.fixture
def headmap(run_path):
    with open_run(run_path) as run:
        return HeadMap.from_run(run)


def test_labels_and_json_roundtrip(headmap, tmp_path):
    heads = {(h["layer"], h["head"]): h for h in headmap.heads()}
    assert heads[(0, 0)]["labels"] == ["sink"]
    assert heads[(1, 3)]["labels"] == ["retrieval", "sink"] and heads[(1, 3)]["kv_head"] == 1
    path = headmap.save(tmp_path / "map.json")
    again = HeadMap.load(path)
    assert again.model == headmap.model and again.policy == headmap.policy
    np.testing.assert_allclose(again.tables["retrieval"].values, RETRIEVAL)
    assert again.datasets["retrieval"] == "needles (3 items)"
    assert len(headmap.to_frame()) == 8


def test_invalid_headmap_files(tmp_path, headmap):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(HeadMapError, match="is not JSON"):
        HeadMap.load(bad)
    document = headmap.to_json()
    document["policy"]["gqa_rule"] = "median"
    bad.write_text(json.dumps(document))
    with pytest.raises(HeadMapError, match="not a valid HeadMap at policy/gqa_rule"):
        HeadMap.load(bad)
    with pytest.raises(HeadMapError, match="no such HeadMap file"):
        HeadMap.load(tmp_path / "missing.json")


def test_selection_rules(headmap):
    by_threshold = select_full(headmap)
    assert by_threshold.kv_full.tolist() == [[True, False], [False, True]]
    assert by_threshold.rule == "retrieval > 0.1 (max over KV group)"
    assert select_full(headmap, threshold=0.4).kv_full.tolist() == [[False, False], [False, True]]
    assert select_full(headmap, full_fraction=0.25).kv_full.sum() == 1
    assert select_full(headmap, full_fraction=1.0).kv_full.all()
    headmap.policy = Policy(gqa_rule="mean")
    assert select_full(headmap).kv_full.tolist() == [[True, False], [False, True]]
    assert select_full(headmap, threshold=0.2).kv_full.tolist() == [[False, False], [False, True]]
    with pytest.raises(HeadMapError, match="has no threshold"):
        select_full(headmap, score="entropy")
    with pytest.raises(HeadMapError, match="not both"):
        select_full(headmap, threshold=0.1, full_fraction=0.5)


# -- the consumers' loading code ---------------------------------------------------------------


def duo_load_attn_pattern(attn_load_dir):
    """mit-han-lab/duo-attention, duo_attn/utils.py ``load_attn_pattern`` (``os.path.join`` and
    ``json.load(open(...))`` as there)."""
    full_attention_heads = np.loadtxt(
        os.path.join(attn_load_dir, "full_attention_heads.tsv"), dtype=float, delimiter="\t"
    )
    full_attention_heads = np.clip(full_attention_heads, 0, 1)
    config = json.load(open(os.path.join(attn_load_dir, "config.json")))  # noqa: SIM115 (theirs)
    return full_attention_heads, config["sink_size"], config["recent_size"]


def duo_sparsify_attention_heads(full_attention_heads, sparsity, seed=0):
    """duo_attn/utils.py ``sparsify_attention_heads`` with ``sparsity`` given, as every script of
    the repository calls it (its ``threshold``-only path fails on ``None >= 1``). The tie-breaking
    noise is seeded here."""
    full_attention_heads = full_attention_heads + np.random.default_rng(seed).uniform(
        0, 1e-6, full_attention_heads.shape
    )
    threshold = np.quantile(full_attention_heads, sparsity)
    if sparsity >= 1:
        threshold = 2
    if sparsity <= 0:
        threshold = -1
    return full_attention_heads >= threshold


def kvpress_streaming_mask(head_scores, head_compression_ratio):
    """NVIDIA kvpress 0.5.5, presses/duo_attention_press.py ``post_init_from_model``: the lowest
    ``round(n * head_compression_ratio)`` scores become streaming heads."""
    n_pruned = round(head_scores.size * head_compression_ratio)
    streaming_mask = np.zeros(head_scores.shape, dtype=bool)
    if n_pruned > 0:
        indices = np.argsort(head_scores, axis=None)[:n_pruned]
        streaming_mask[np.unravel_index(indices, head_scores.shape)] = True
    return streaming_mask


def razor_kv_and_query_heads(path, layer, num_heads, num_kv_heads):
    """mindspore-ai/golden-stick, razor_attention.py ``_get_deploy_network`` (``head_dict.get``)
    and attention_wrappers.py ``DeployRACompressCell._load_retrieval_head``."""
    with open(path, encoding="utf-8") as f:
        head_dict = json.load(f)
    kv_retri_heads = head_dict.get(str(layer), [])
    num_kv_group = num_heads // num_kv_heads
    q_retri_heads = [
        i for h in kv_retri_heads for i in range(h * num_kv_group, (h + 1) * num_kv_group)
    ]
    return kv_retri_heads, q_retri_heads


def moa_cache_sizes(path, seq_len, max_new_token=1024):
    """thu-nics/MoA: ``json.load`` of the config (scripts/evaluate/*.py), then the per-head cache
    size of attention/cache_utils.py ``moa_config_to_cache_config`` before its rounding up to a
    multiple of 64 (at least 128): ``min(int(alpha + N * beta), N)``, N = seq_len + max_new."""
    with open(path) as f:
        moa_config = json.load(f)
    alphas, betas = moa_config["alphas"], moa_config["betas"]
    n = seq_len + max_new_token
    return [
        [min(int(alphas[layer][h] + n * betas[layer][h]), n) for h in range(len(alphas[layer]))]
        for layer in range(len(alphas))
    ]


# -- the formats ------------------------------------------------------------------------------


def test_duo_scores_are_ranked_by_its_consumers_into_the_map(headmap, tmp_path, tiny_model):
    tsv, config = export(headmap, "duo", tmp_path, full_fraction=0.5)
    heads, sink, recent = duo_load_attn_pattern(tmp_path)
    assert heads.shape == (tiny_model.info.n_layers, tiny_model.info.n_kv_heads)
    assert (sink, recent) == (4, 256)
    # KV scores (max over groups (0,1), (2,3)) [[0.30, 0.02], [0.00, 0.50]], divided by 0.50
    np.testing.assert_allclose(heads, [[0.6, 0.04], [0.0, 1.0]], rtol=1e-6)
    assert tsv.read_text().splitlines()[0] == "\t".join(f"{v:.18e}" for v in heads[0])
    sparsity = json.loads(config.read_text())["sparsity"]
    assert sparsity == 0.5
    expected = select_full(headmap, full_fraction=0.5).kv_full
    assert duo_sparsify_attention_heads(heads, sparsity).tolist() == expected.tolist()
    assert (~kvpress_streaming_mask(heads, sparsity)).tolist() == expected.tolist()


def test_duo_binary_values_and_one_kv_head_per_layer(headmap, tmp_path):
    export(headmap, "duo", tmp_path, values="binary")
    heads, _, _ = duo_load_attn_pattern(tmp_path)
    assert heads.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # One KV head per layer: np.loadtxt squeezes the rows to a 1-D array; ndmin=2 restores it
    info = dataclasses.replace(headmap.model, n_heads=2, n_kv_heads=1)
    table = headmap.tables["retrieval"]
    mqa = HeadMap(info, {"retrieval": dataclasses.replace(table, values=table.values[:, :2])})
    (tsv, _) = export(mqa, "duo", tmp_path / "mqa", values="binary")
    assert duo_load_attn_pattern(tmp_path / "mqa")[0].shape == (2,)
    assert np.loadtxt(tsv, dtype=float, delimiter="\t", ndmin=2).tolist() == [[1.0], [0.0]]


def test_layer_heads_reads_back_through_razorattention(headmap, tmp_path):
    (path,) = export(headmap, "layer-heads", tmp_path / "kv", threshold=0.1)
    assert json.loads(path.read_text()) == {"0": [0], "1": [1]}  # KV heads, the default
    info = headmap.model
    assert razor_kv_and_query_heads(path, 1, info.n_heads, info.n_kv_heads) == ([1], [2, 3])
    (path,) = export(headmap, "layer-heads", tmp_path / "q", index="query")
    assert json.loads(path.read_text()) == {"0": [0, 1], "1": [2, 3]}


def test_moa_spans(headmap, tmp_path):
    (path,) = export(headmap, "moa", tmp_path, threshold=0.1)
    assert path.name == "moa_alpha_beta.json" and len(path.read_text().splitlines()) == 1
    # full KV heads: layer 0 KV 0 (query heads 0, 1), layer 1 KV 1 (query heads 2, 3)
    assert json.loads(path.read_text()) == {
        "alphas": [[0.0, 0.0, 260.0, 260.0], [260.0, 260.0, 0.0, 0.0]],
        "betas": [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]],
    }
    n = 4000 + 1024
    assert moa_cache_sizes(path, 4000) == [[n, n, 260, 260], [260, 260, n, n]]


def test_files_get_the_umask_permissions(headmap, tmp_path):
    umask = os.umask(0o022)
    try:
        paths = [p for fmt in FORMATS for p in export(headmap, fmt, tmp_path / fmt)]
    finally:
        os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o644)}


def test_format_options_belong_to_their_format(headmap, tmp_path):
    with pytest.raises(HeadMapError, match="values applies to the 'duo' format only"):
        export(headmap, "moa", tmp_path, values="binary")
    with pytest.raises(HeadMapError, match="index must be one of kv, query, got 'kv-head'"):
        export(headmap, "layer-heads", tmp_path, index="kv-head")
    assert not tmp_path.joinpath("moa_alpha_beta.json").exists()


def _headmap(scores: np.ndarray, group: int = 1) -> HeadMap:
    """An in-memory map whose ``retrieval`` KV scores are ``scores`` [n_layers, n_kv_heads]."""
    n_layers, n_kv = scores.shape
    info = ModelInfo("m", "memory", "r", "LlamaForCausalLM", n_layers, n_kv * group, n_kv,
                     8, 32, True, 64, "h")  # fmt: skip
    values = np.repeat(scores, group, axis=1)  # [n_layers, n_heads]: each KV group shares it
    return HeadMap(info, {"retrieval": ScoreTable("retrieval", values, "test", 0.1, "retrieval")})


OPTION_TEXT = st.one_of(st.none(), st.sampled_from(["scores", "binary", "kv", "query"]), st.text())


@given(fmt=st.sampled_from(FORMATS), values=OPTION_TEXT, index=OPTION_TEXT)
@settings(max_examples=60, deadline=None)
def test_format_options_are_accepted_exactly_where_they_apply(fmt, values, index):
    """Any ``values`` / ``index`` is either an option of ``fmt`` among its choices (files are
    written) or one HeadMapError (nothing is written); never silently ignored."""
    hm = _headmap(np.array([[0.3, 0.0], [0.2, 0.5]], dtype=np.float32), group=2)
    fits = (values is None or (fmt == "duo" and values in ("scores", "binary"))) and (
        index is None or (fmt == "layer-heads" and index in ("kv", "query"))
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if fits:
            assert export(hm, fmt, out, values=values, index=index)
        else:
            with pytest.raises(HeadMapError):
                export(hm, fmt, out, values=values, index=index)
            assert not out.exists()


KV_SCORES = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=5),
    elements=st.one_of(st.sampled_from([0.0, 0.25, np.nan]), st.floats(0, 1, width=32)),
)


@given(scores=KV_SCORES, fraction=st.floats(0, 1), group=st.sampled_from([1, 3]))
@settings(max_examples=80, deadline=None)
def test_duo_scores_keep_the_order_and_reproduce_the_map_unless_tied(scores, fraction, group):
    """Any scores (ties, NaN, one layer, one KV head per layer): the values lie in [0, 1] and
    keep the scores' order; no streaming head outranks a full one; and unless a full and a
    streaming head tie, both consumers' rankings at the written sparsity give back exactly the
    map. The binary file is always the map. layer-heads and moa carry the same map."""
    with tempfile.TemporaryDirectory() as tmp:
        _check_formats_carry_the_map(_headmap(scores, group), fraction, Path(tmp))


def _check_formats_carry_the_map(hm: HeadMap, fraction: float, tmp_path: Path) -> None:
    scores = hm.kv_scores("retrieval")  # [n_layers, n_kv_heads]
    group = hm.model.group_size
    selection = select_full(hm, full_fraction=fraction)
    full = selection.kv_full
    out = tmp_path / "duo"
    export(hm, "duo", out, full_fraction=fraction)
    heads = np.loadtxt(out / "full_attention_heads.tsv", dtype=float, delimiter="\t", ndmin=2)
    assert heads.shape == scores.shape and ((heads >= 0) & (heads <= 1)).all()
    finite = np.isfinite(scores)
    a, b = np.nonzero(finite.ravel()[:, None] & finite.ravel()[None, :])
    flat, written = scores.ravel(), heads.ravel()
    assert (written[a] >= written[b])[flat[a] > flat[b]].all()  # order kept
    assert written[full.ravel()].min(initial=1) >= written[~full.ravel()].max(initial=0)
    sparsity = json.loads((out / "config.json").read_text())["sparsity"]
    if not selection.tied_at_cut:
        assert (~kvpress_streaming_mask(heads, sparsity) == full).all()
        assert (duo_sparsify_attention_heads(heads, sparsity) == full).all()
    export(hm, "duo", tmp_path / "bin", full_fraction=fraction, values="binary")
    binary = np.loadtxt(tmp_path / "bin" / "full_attention_heads.tsv", delimiter="\t", ndmin=2)
    assert (binary.astype(bool) == full).all()
    (path,) = export(hm, "layer-heads", tmp_path / "lh", full_fraction=fraction)
    listed = {(int(k), h) for k, hs in json.loads(path.read_text()).items() for h in hs}
    assert listed == {(int(a), int(b)) for a, b in zip(*np.nonzero(full), strict=True)}
    (path,) = export(hm, "moa", tmp_path / "moa", full_fraction=fraction)
    betas = np.asarray(json.loads(path.read_text())["betas"])  # [n_layers, n_heads]
    assert (betas.astype(bool) == np.repeat(full, group, axis=1)).all()


def test_normalised_scores_edge_cases():
    assert normalised_scores(np.array([[np.nan, np.nan]])).tolist() == [[0.0, 0.0]]
    assert normalised_scores(np.array([[0.3, np.nan, 0.3]])).tolist() == [[1.0, 0.0, 1.0]]
    assert normalised_scores(np.array([[-1.0, 1.0, 0.0]])).tolist() == [[0.0, 1.0, 0.5]]


def test_layer_heads_and_head_scores(headmap, tmp_path):
    (layer_heads,) = export(headmap, "layer-heads", tmp_path)
    assert json.loads(layer_heads.read_text()) == {"0": [0], "1": [1]}
    (head_scores,) = export(headmap, "head-scores", tmp_path)
    scores = json.loads(head_scores.read_text())
    assert scores["1-3"] == [1.0, 0.0]  # the NaN trial (not counted) is left out
    assert len(scores) == 8
    first = head_scores.read_bytes()
    export(headmap, "head-scores", tmp_path)
    assert head_scores.read_bytes() == first  # deterministic


def test_cli_export_and_identity_checks(run_path, tmp_path, capsys):
    assert main(["export", str(run_path), "--format", "duo", "--out", str(tmp_path / "d")]) == 0
    assert "full attention: 2/4 KV heads (retrieval > 0.1" in capsys.readouterr().out
    assert main(["export", str(run_path), "--format", "json", "--out", str(tmp_path / "j")]) == 0
    HeadMap.load(tmp_path / "j" / "headmap.json")
    cases = [
        (["--model", "llama"], "was made with tiny-llama (2 layers x 4 heads, 2 KV heads, config "),
        (["--model", "llama"], "not with llama (name differs)"),
        (["--heads", "30,9,3"], "not with 30 layers x 9 heads, 3 KV heads (layer count, head "),
        (["--score", "nope"], "no score 'nope'"),
        (["--index", "kv"], "index applies to the 'layer-heads' format only, not 'duo'"),
    ]
    for extra, message in cases:
        argv = ["export", str(run_path), "--format", "duo", "--out", str(tmp_path / "x"), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before any work
        main(["export", str(run_path), "--format", "duo", "--out", str(tmp_path / "x"),
              "--heads", "30,9"])  # fmt: skip
    assert stop.value.code == 2
    assert "expected L,H,KV (three integers), got '30,9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # so is a fraction outside [0, 1]
        main(["export", str(run_path), "--format", "duo", "--out", str(tmp_path / "x"),
              "--full-fraction", "1.5"])  # fmt: skip
    assert stop.value.code == 2
    assert "expected a finite number in [0, 1], got '1.5'" in capsys.readouterr().err


def test_cli_notes_ties_at_the_cut(run_path, tmp_path, capsys):
    """KV scores of "sink" (1 - retrieval, max over groups): [[0.95, 1.0], [1.0, 0.88]]; the top
    quarter is one of the two 1.0 heads, so a consumer ranking the scores may take the other."""
    argv = ["export", str(run_path), "--score", "sink", "--full-fraction", "0.25", "--format"]
    assert main([*argv, "duo", "--out", str(tmp_path / "scores")]) == 0
    assert "tie at the cut" in capsys.readouterr().err
    assert main([*argv, "duo", "--out", str(tmp_path / "binary"), "--values", "binary"]) == 0
    assert "tie" not in capsys.readouterr().err
    assert main([*argv, "layer-heads", "--out", str(tmp_path / "lh"), "--index", "query"]) == 0
    assert json.loads((tmp_path / "lh" / "layer_heads.json").read_text()) == {"0": [2, 3]}


@given(st.text(alphabet=" ,0123456789-+_x.", max_size=12))
@example("--")  # argparse drops a "--" value without calling the type
def test_heads_option_takes_exactly_three_counts(text):
    """``--heads`` is three comma-separated counts (spaces allowed) or a usage error, never a
    reinterpretation: it asserts exactly the numbers it was given."""
    argv = ["export", "r.h5", "--format", "duo", "--out", "x", f"--heads={text}"]
    parts = [p.strip(" ") for p in text.split(",")]
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        counts = build_parser().parse_args(argv).heads
        assert counts == {
            "n_layers": int(parts[0]),
            "n_heads": int(parts[1]),
            "n_kv_heads": int(parts[2]),
        }
    else:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
