import h5py
import pytest

from workbench.cli import main


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "minilm" in out and "installed" in out


def test_help_for_each_subcommand(capsys):
    for command in ["models", "scan", "show", "cache"]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--prompts" in capsys.readouterr().out


def test_scan_then_show(tiny_llama_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert (
        main(
            [
                "scan",
                str(tiny_llama_dir),
                "--prompts",
                str(prompt_file),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"run file: {out}" in printed and "heads labelled 'sink'" in printed
    assert main(["show", str(out), "--scores", "sink"]) == 0
    shown = capsys.readouterr().out
    assert "tiny-llama" in shown and "basic (5 items)" in shown and "entropy" not in shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scan", "no-such-model-xyz"], "unknown model 'no-such-model-xyz'"),
        (["scan", "MODEL", "--prompts", "missing.jsonl"], "no prompt file missing.jsonl"),
        (["scan", "MODEL", "--probes", "sink,bogus"], "unknown probe(s) bogus"),
        (["show", "missing.h5"], "no such file: missing.h5"),
        (["show", "FOREIGN"], "is not a workbench file"),
        (["show", "RUN", "--scores", "nope"], "has no score 'nope'"),
        (
            ["cache", "MODEL", "--prompts", "PROMPTS", "--hooks", "zzz", "--out", "c.h5"],
            "no hook matches 'zzz'",
        ),
    ],
)
def test_user_errors_are_one_line_exit_2(
    argv, message, tiny_llama_dir, prompt_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    if "RUN" in argv:
        main(
            [
                "scan",
                str(tiny_llama_dir),
                "--prompts",
                str(prompt_file),
                "--out",
                "run.h5",
                "--quiet",
            ]
        )
        capsys.readouterr()
    replace = {
        "MODEL": str(tiny_llama_dir),
        "PROMPTS": str(prompt_file),
        "FOREIGN": str(foreign),
        "RUN": "run.h5",
    }
    assert main([replace.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error:") and message in err and "\n" not in err


def test_probe_options_are_parsed():
    from workbench.cli import build_parser

    args = build_parser().parse_args(
        [
            "scan",
            "m",
            "--option",
            "lengths=1024,2048",
            "--option",
            "variant=teacher",
            "--option",
            "depths=[0.1, 0.5]",
            "--option",
            "sink_size=4",
        ]
    )
    assert dict(args.option) == {
        "lengths": [1024, 2048],
        "variant": "teacher",
        "depths": [0.1, 0.5],
        "sink_size": 4,
    }
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scan", "m", "--option", "novalue"])


def test_export_format_choices_are_the_exporters():
    """The parser stays light (it cannot import workbench.export), so its --format choices are
    written out; they must be exactly the formats the exporter writes."""
    from workbench.cli import build_parser
    from workbench.export import FORMATS

    parser = build_parser()
    export = parser._subparsers._group_actions[0].choices["export"]
    (fmt,) = [a for a in export._actions if a.dest == "format"]
    assert tuple(fmt.choices) == FORMATS
