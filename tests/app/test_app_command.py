"""`workbench app`: bad arguments are one clear line and exit code 2; it binds 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.cli import build_parser, main


def test_defaults_bind_to_this_machine_only() -> None:
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.runs) == ("127.0.0.1", 8050, [])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["app", "{tmp}/nothing.h5"], "no such run file"),
        (["app", "--runs-dir", "{tmp}/missing"], "no runs directory"),
        (["app", "{tmp}", "--runs-dir", "{tmp}"], "one runs directory"),
    ],
)
def test_bad_arguments(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("workbench: error:") and message in err
    assert err.count("\n") == 1
