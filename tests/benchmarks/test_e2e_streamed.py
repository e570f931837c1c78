"""The end-to-end benchmark script, run whole on the CPU with a tiny random Llama (``--tiny``).

The timings of a CPU run mean nothing; what is checked is that every measurement of the GPU run
happens and lands in the JSON and in the docs block: the plain forward under each SDPA backend
(those the CPU lacks reported as not running), the streamed variants, the logit drift between
backends and of the fused kernel, the decoding rows and the targets. Two facts hold on any
device: recording with SDPA's output changes neither the logits nor the generated tokens.
"""

import contextlib
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import e2e_streamed

OUTSIDE_BEFORE = "# Benchmarks\n\nText before the block.\n\n"
OUTSIDE_AFTER = "\n\n## After\n\nText after the block.\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    docs = out / "benchmarks.md"
    docs.write_text(
        OUTSIDE_BEFORE + e2e_streamed.MARK_START + "\nold table\n" + e2e_streamed.MARK_END
        + OUTSIDE_AFTER
    )  # fmt: skip
    argv = ["--tiny", "--device", "cpu", "--repeats", "1", "--decode-tokens", "3",
            "--out", str(out), "--docs", str(docs)]  # fmt: skip
    assert e2e_streamed.main(argv) == 0
    (written,) = out.glob("*-e2e.json")
    return json.loads(written.read_text()), docs.read_text()


def test_scan_rows_cover_every_backend_and_variant(tiny_run):
    result, _ = tiny_run
    assert result["length"] == e2e_streamed.MIN_LENGTH
    assert "--tiny" in result["command"] and "--decode-tokens 3" in result["command"]
    plain = {row["sdpa"]: row for row in result["rows"] if row["variant"] == "plain"}
    assert set(plain) == {"flash", "cudnn", "efficient", "math"}  # math fits at 128 tokens
    assert "error" in plain["cudnn"] and "error" in plain["efficient"]  # CUDA-only backends
    ran = {name: row["ms"] for name, row in plain.items() if "error" not in row}
    assert set(ran) == {"flash", "math"} and result["baseline"] == min(ran, key=ran.get)
    assert plain[result["baseline"]]["ratio_to_plain"] == 1.0
    streamed = [row for row in result["rows"] if row["variant"] != "plain"]
    assert streamed[0]["variant"] == "streamed" and len(streamed) == 7
    for row in streamed:
        assert row["sdpa"] == result["baseline"] and row["ms"] > 0
        assert row["ratio_to_plain"] == pytest.approx(row["ms"] / ran[result["baseline"]])


def test_logit_drift_compares_every_pair_in_the_same_run(tiny_run):
    result, _ = tiny_run
    drift = result["logit_drift"]
    assert drift["positions"] == e2e_streamed.LAST
    assert set(drift["between_backends"]) == {"flash vs math"}
    assert set(drift["kernel_vs_backend"]) == {"flash", "math"}
    assert all(value >= 0 for value in drift["kernel_vs_backend"].values())
    # SDPA's output under the recorder is the plain forward's, bit for bit
    assert drift["streamed_sdpa_output_vs_plain"] == 0


def test_decoding_rows(tiny_run):
    result, _ = tiny_run
    decoding = result["decode"]
    assert decoding["prompt"] == result["length"] and decoding["tokens"] == 3
    rows = {(row["variant"], row["sdpa"]): row for row in decoding["rows"]}
    baseline = rows[("plain", decoding["baseline"])]
    assert baseline["ratio_to_plain"] == 1.0 and baseline["syncs_per_token"] is None  # no CUDA
    recorded = [row for row in decoding["rows"] if row["variant"] != "plain"]
    assert len(recorded) == 3
    for row in recorded:
        assert row["ms_per_token"] > 0 and row["sdpa"] == decoding["baseline"]
        if "output=sdpa" in row["variant"]:  # recording does not change what is generated
            assert row["same_tokens_as_baseline"] is True
    alone = decoding["attention_one_layer"]
    assert alone["keys"] == result["length"] and alone["heads"] == 4 and alone["d_head"] == 16
    assert alone["ms"]["fused statistics + output"] > 0 and alone["ms"]["statistics only"] > 0


def test_targets_and_docs_block(tiny_run):
    result, docs = tiny_run
    targets = result["targets"]
    assert len(targets) == 4
    scan, decoding, drift, syncs = targets
    streamed = next(row for row in result["rows"] if row["variant"] == "streamed")
    assert scan["met"] == (streamed["ratio_to_plain"] <= e2e_streamed.TARGETS["scan"])
    best = min(r["ratio_to_plain"] for r in result["decode"]["rows"] if r["variant"] != "plain")
    assert decoding["met"] == (best <= e2e_streamed.TARGETS["decode"])
    floor = max(result["logit_drift"]["between_backends"].values())
    assert drift["met"] == (max(result["logit_drift"]["kernel_vs_backend"].values()) <= floor)
    assert syncs["met"] is None  # measured only with CUDA

    # the block is replaced in place; the text around it stays
    assert docs.startswith(OUTSIDE_BEFORE + e2e_streamed.MARK_START)
    assert docs.endswith(e2e_streamed.MARK_END + OUTSIDE_AFTER)
    assert "old table" not in docs and docs.count(e2e_streamed.MARK_START) == 1
    for target in targets:
        assert f"| {target['target']} | {target['measured']} |" in docs
    for row in result["rows"] + result["decode"]["rows"]:
        assert f"| {row['variant']} | {row['sdpa']} |" in docs
    assert "| SDPA flash vs math |" in docs and "does not run" in docs


def test_docs_block_is_appended_where_there_is_none(tiny_run, tmp_path):
    result, _ = tiny_run
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    e2e_streamed.write_docs(result, docs)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n" + e2e_streamed.MARK_START)
    assert text.rstrip().endswith(e2e_streamed.MARK_END)


def _parse(argv: list[str]) -> tuple[object, str]:
    """Parsed arguments (None on a usage error) and what the parser wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return e2e_streamed.build_parser().parse_args(argv), err.getvalue()
        except SystemExit as stop:
            assert stop.code == 2
            return None, err.getvalue()


@settings(max_examples=40, deadline=None)
@given(length=st.integers(-(10**6), 10**6), tokens=st.integers(-100, 10**4))
def test_lengths_and_token_counts_are_checked_integers(length, tokens):
    args, err = _parse(["--length", str(length), "--decode-tokens", str(tokens)])
    if length >= e2e_streamed.MIN_LENGTH and tokens >= 1:
        assert args.length == length and args.decode_tokens == tokens and not err
    else:
        assert args is None and err.count("\n") == 1 and "expected an integer >=" in err


@pytest.mark.parametrize(
    "argv",
    [["--length", "32k"], ["--length", "1e4"], ["--repeats", "0"], ["--layers", "-1"],
     ["--device", "gpu 0"], ["--decode-tokens", ""]],
)  # fmt: skip
def test_malformed_arguments_are_one_line_usage_errors(argv):
    args, err = _parse(argv)
    assert args is None and err.count("\n") == 1
    assert err.startswith("python -m benchmarks.e2e_streamed: error: argument " + argv[0])
