"""The benchmark's bookkeeping (targets, tables, the docs blocks) on hand-made result rows, and
``--check`` as a CPU dry run; the timings themselves need a GPU (`python -m kernels.bench`)."""

import contextlib
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import bench


def row(method, length, ms, *, kv=32, d=128, sdpa_ms=1.0, **extra):
    r = dict(n_heads=32, n_kv_heads=kv, d_head=d, length=length, method=method, ms=ms, **extra)
    r["ratio_to_sdpa"] = ms / sdpa_ms
    return r


def test_targets_take_the_worst_shape():
    rows = [
        row("stats", 1024, 9.0),  # below 4K: not part of the target
        row("stats", 4096, 0.6),
        row("stats", 8192, 1.2, kv=8, d=64),
        row("stats+recv", 8192, 1.9),
        row("stats", 131072, 0.4, peak_extra_gib=0.1),
        row("stats+recv", 131072, 9.0, peak_extra_gib=2.5),
        row("naive", 8192, 30.0),
        row("naive", 8192, 15.0, kv=8),
    ]
    got = {t["target"]: t for t in bench.targets(rows)}
    stats = got["stats ≤ 1.0× SDPA at L ≥ 4K"]
    assert stats["worst"] == 1.2 and not stats["met"] and stats["where"] == "kv=8 d=64 L=8K"
    assert got["stats + received ≤ 2.0× SDPA at L ≥ 4K"]["worst"] == 9.0  # the 128K row
    assert got["stats at 128K: < 2 GiB beyond q/k/v"]["met"]
    assert not got["stats + received at 128K: < 2 GiB beyond q/k/v"]["met"]
    naive = got["naive ≥ 20× SDPA at 8K"]
    assert naive["worst"] == 15.0 and not naive["met"]


def test_unmeasured_target_is_marked_not_measured():
    (first, *_) = bench.targets([row("sdpa", 4096, 1.0)])
    assert math.isnan(first["worst"]) and first["where"] == "not measured"
    assert first["met"] is None


def test_write_docs_replaces_only_its_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\nintro\n\n{bench.MARK_START}\nold\n{bench.MARK_END}\n\nother section\n")
    rows = [
        row("sdpa", 4096, 1.0),
        row("stats", 4096, 0.5, max_error={"entropy": 2e-5, "argmax_agree": 1.0}),
        dict(n_heads=32, n_kv_heads=32, d_head=128, length=16384, method="naive",
             error="out of memory"),
    ]  # fmt: skip
    result = dict(device_name="GPU X", torch="t", triton="tr", date="today", command="cmd",
                  rows=rows, targets=bench.targets(rows))  # fmt: skip
    bench.write_docs(result, doc)
    text = doc.read_text()
    assert text.startswith("# B\n\nintro\n\n") and text.endswith("\n\nother section\n")
    assert "old" not in text and "GPU X" in text
    assert "| 4K | 1.000 | – | – | 0.500 (0.50×) |" in text
    assert "| 16K | – | – | OOM |" in text and "2.0e-05" in text
    bench.write_docs(result, doc)  # idempotent
    assert doc.read_text() == text


def test_variant_table_and_its_own_docs_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\n{bench.MARK_START}\nmain\n{bench.MARK_END}\n\nother\n")

    def vrow(method, length, ms, **extra):
        return dict(variant="window 4096", n_heads=32, n_kv_heads=8, d_head=128, length=length,
                    method=method, ms=ms, tflops=100.0, peak_extra_gib=0.5, **extra)  # fmt: skip

    err = {"entropy": 3e-3, "output": 8e-3, "argmax_agree": 1.0, "flex_vs_ours": 9e-3}
    rows = [
        vrow("stats", 8192, 1.0, ratio_to_flex=0.5, max_error=err),
        vrow("stats+out", 8192, 1.5, ratio_to_flex=0.75, max_error=err),
        vrow("flex", 8192, 2.0, ratio_to_flex=1.0, max_error=err),
        {**vrow("stats", 8192, 4.0), "variant": "causal"},
        dict(variant="window 4096", n_heads=32, n_kv_heads=8, d_head=128, length=131072,
             method="flex", error="out of memory"),
    ]  # fmt: skip
    result = dict(device_name="GPU X", torch="t", triton="tr", date="today", command="cmd",
                  rows=rows)  # fmt: skip
    bench.write_variant_docs(result, doc)
    text = doc.read_text()
    assert text.startswith(f"# B\n\n{bench.MARK_START}\nmain\n{bench.MARK_END}\n\nother\n")
    assert (
        "| window 4096 | 8K | 1.000 (0.50×) | 1.500 (0.75×) | 2.000 | 0.25× | 100 | 0.50 GiB |"
        in text
    )
    assert "| 8.0e-03 | 9.0e-03 |" in text  # worst error without argmax / flex; flex vs ours
    assert "| window 4096 | 128K | n/a | n/a | OOM | – |" in text
    bench.write_variant_docs(result, doc)  # idempotent, and the main block stays
    assert doc.read_text() == text
    bench.write_docs(
        dict(device_name="G", torch="t", triton="tr", date="d", command="c", rows=[],
             targets=bench.targets([])),
        doc,
    )  # fmt: skip
    assert bench.VARIANT_MARK_START in doc.read_text() and "main\n" not in doc.read_text()


def test_visible_pairs():
    assert bench._visible_pairs(8, None) == 36 and bench._visible_pairs(8, 100) == 36
    # window 3: 1 + 2 + 3·6
    assert bench._visible_pairs(8, 3) == 21


def test_check_is_a_cpu_dry_run_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --check runs the real checks")
    assert bench.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == len(bench.CHECK_CASES)
    assert "window=65" in out and "sinks" in out and "d_v=128" in out and "alibi" in out


@settings(max_examples=30, deadline=None)
@given(kv=st.integers(-64, 64), length=st.integers(-(10**6), 10**6))
def test_shapes_and_lengths_are_checked(kv, length):
    argv = ["--kv-heads", str(kv), "--lengths", str(length)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = bench.build_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
            args = None
    if kv in (8, 32) and length >= 1:
        assert args.kv_heads == [kv] and args.lengths == [length] and not err.getvalue()
    else:  # a usage error is one line
        assert args is None and err.getvalue().count("\n") == 1
        assert err.getvalue().startswith("python -m kernels.bench: error: argument")
