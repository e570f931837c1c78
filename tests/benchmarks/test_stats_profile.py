"""benchmarks.stats_profile's arguments (the profile itself needs a GPU with ncu)."""

import contextlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import stats_profile


def _parse(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return stats_profile.build_parser().parse_args(argv), err.getvalue()
        except SystemExit as e:
            assert e.code == 2
            return None, err.getvalue()


@settings(max_examples=40, deadline=None)
@given(d=st.integers(-1000, 1000), length=st.integers(-(10**6), 10**6),
       mode=st.sampled_from([*stats_profile.MODES, "stats+recv", ""]))  # fmt: skip
def test_once_takes_a_known_mode_and_checked_integers(d, length, mode):
    args, err = _parse(["--once", mode, "--d", str(d), "--length", str(length)])
    if mode in stats_profile.MODES and 1 <= d <= 256 and length >= 1:
        assert (args.once, args.d, args.length) == (mode, d, length) and not err
    else:
        assert args is None and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv", [["--d", "64.0"], ["--length", "16k"], ["--modes", "stats", "all"], ["--once"]]
)
def test_malformed_arguments_are_one_line_usage_errors(argv):
    args, err = _parse(argv)
    assert args is None and err.count("\n") == 1
    assert err.startswith("python -m benchmarks.stats_profile: error: argument " + argv[0])


def test_a_profile_needs_an_output_directory():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        stats_profile.main([])
    assert e.value.code == 2 and "--out DIR is needed" in err.getvalue()
