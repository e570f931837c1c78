"""benchmarks.e2e_profile: its interval and kernel arithmetic, and the whole script on the CPU
with a tiny random Llama (``--tiny``; the GPU's kernel rows are then empty, the host rows not)."""

import contextlib
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import e2e_profile


@pytest.mark.parametrize(
    "intervals, ms",
    [
        ([], 0.0),
        ([(0, 1000)], 1.0),
        ([(0, 1000), (500, 1500)], 1.5),  # overlapping
        ([(0, 3000), (1000, 2000)], 3.0),  # nested
        ([(2000, 3000), (0, 1000)], 2.0),  # disjoint, out of order
    ],
)
def test_busy_time_is_the_union_of_kernel_intervals(intervals, ms):
    assert e2e_profile.busy_ms(intervals) == pytest.approx(ms)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), max_size=12))
def test_busy_time_matches_counting_covered_microseconds(spans):
    intervals = [(start, start + length) for start, length in spans]
    covered = {t for start, stop in intervals for t in range(start, stop)}
    assert e2e_profile.busy_ms(intervals) == pytest.approx(len(covered) / 1e3)


@pytest.mark.parametrize(
    "name, group",
    [
        ("_stats_fwd", "statistics kernels"),
        ("_combine_splits", "statistics kernels"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "SDPA"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "SDPA"),
        ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "GEMM"),
        ("void at::native::elementwise_kernel<128, 2>", "other"),
    ],
)
def test_kernels_are_grouped_by_name(name, group):
    assert e2e_profile.kernel_group(name) == group


KINDS = ("operators.txt", "cprofile.txt", "trace.json")


STEMS = ("scan-plain", "scan-recorded", "decode-plain", "decode-recorded")


def test_tiny_run_profiles_every_phase_on_the_cpu(tmp_path):
    argv = ["--tiny", "--device", "cpu", "--decode-tokens", "2", "--out", str(tmp_path)]
    assert e2e_profile.main(argv) == 0
    result = json.loads((tmp_path / "e2e-profile.json").read_text())
    phases = result["phases"]
    assert list(phases) == ["scan plain", "scan recorded", "decode plain", "decode recorded"]
    assert phases["decode recorded"]["steps"] == 2 and phases["scan plain"]["steps"] == 1
    for phase in phases.values():
        assert phase["wall_ms"] > 0 and phase["kernel_launches"] == 0  # no GPU here

    def ours(phase):
        return [f for f in phases[phase]["host_ms_by_function_under_cprofile"] if "workbench/" in f]

    assert not ours("decode plain") and not ours("scan plain")
    assert any("streamed_attention" in f for f in ours("decode recorded"))
    assert any("streamed_attention" in f for f in ours("scan recorded"))
    for stem in STEMS:
        assert "Self CPU" in (tmp_path / f"{stem}-operators.txt").read_text()
        assert "cumulative" in (tmp_path / f"{stem}-cprofile.txt").read_text()
        assert json.loads((tmp_path / f"{stem}-trace.json").read_text())["traceEvents"]
    written = {"e2e-profile.json"} | {f"{s}-{k}" for s in STEMS for k in KINDS}
    assert {f.name for f in tmp_path.iterdir()} == written  # no temporary file left behind


@pytest.mark.parametrize(
    "argv",
    [["--layers", "0"], ["--decode-tokens", "-1"], ["--length", "1.5"], ["--sdpa", "fast"], []],
)
def test_bad_arguments_are_one_line_usage_errors(argv, tmp_path):
    err = io.StringIO()
    full = argv if not argv else [*argv, "--out", str(tmp_path)]
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        e2e_profile.main(full)
    assert e.value.code == 2 and err.getvalue().count("\n") == 1


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(-(10**6), 10**6),
    layers=st.integers(-100, 100),
    tokens=st.integers(-100, 100),
)
def test_counts_are_checked_integers(length, layers, tokens):
    argv = ["--out", "x", "--length", str(length), "--layers", str(layers),
            "--decode-tokens", str(tokens)]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = e2e_profile.build_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code == 2 and err.getvalue().count("\n") == 1
            args = None
    ok = length >= e2e_profile.MIN_LENGTH and layers >= 1 and tokens >= 1
    assert (args is not None) == ok
    if ok:
        assert (args.length, args.layers, args.decode_tokens) == (length, layers, tokens)
