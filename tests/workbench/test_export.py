import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workbench.cli import build_parser, main
from workbench.export import export, select_full
from workbench.headmap import HeadMap, HeadMapError, Policy
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


def test_duo_format_reads_back_like_duoattention(headmap, tmp_path, tiny_model):
    tsv, config = export(headmap, "duo", tmp_path, full_fraction=0.5)
    # DuoAttention's loader: np.loadtxt, clip to [0, 1], shape (layers, kv heads), threshold 0.5
    full_attention_heads = np.clip(np.loadtxt(tsv, dtype=float, delimiter="\t"), 0, 1)
    assert full_attention_heads.shape == (tiny_model.info.n_layers, tiny_model.info.n_kv_heads)
    assert (full_attention_heads >= 0.5).tolist() == [[True, False], [False, True]]
    assert "\t" in tsv.read_text() and not tsv.read_text().startswith("#")
    settings = json.loads(config.read_text())
    assert settings["sink_size"] == 4 and settings["recent_size"] == 256


def test_layer_heads_and_head_scores(headmap, tmp_path):
    (layer_heads,) = export(headmap, "layer-heads", tmp_path)
    assert json.loads(layer_heads.read_text()) == {"0": [0, 1], "1": [2, 3]}
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


@given(st.text(alphabet=" ,0123456789-+_x.", max_size=12))
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
