"""The benchmark's bookkeeping (targets, tables, the docs block) on hand-made result rows; the
timings themselves need a GPU (`python -m kernels.bench`)."""

import math

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
