import json

from workbench.cli import main


def test_intervene_spec_writes_json(tiny_llama_dir, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([{"kind": "zero", "heads": ["1.2"]}]))
    out = tmp_path / "result.json"
    code = main(["intervene", str(tiny_llama_dir), "--spec", str(spec), "--task", "loss",
                 "--task-option", "n=2", "--task-option", "length=10", "--controls", "1",
                 "--device", "cpu", "--quiet", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "zero[1.2]" in printed and "loss" in printed
    result = json.loads(out.read_text())
    assert result["interventions"] == [{"kind": "zero", "heads": [[1, 2]]}]
    assert len(result["per_example"]["baseline"]["loss"]) == 2


def test_intervene_sweep(tiny_llama_dir, capsys):
    code = main(["intervene", str(tiny_llama_dir), "--sweep", "scale", "--option", "factor=0.5",
                 "--heads", "0.1,1.3", "--task", "loss", "--task-option", "n=2",
                 "--task-option", "length=8", "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0
    assert "sweep scale on loss" in capsys.readouterr().out


def test_user_errors_exit_2(tiny_llama_dir, capsys):
    base = ["intervene", str(tiny_llama_dir), "--task", "loss", "--device", "cpu", "--quiet"]
    assert main([*base, "--spec", '{"kind": "erase", "heads": [[0, 0]]}']) == 2
    assert "unknown intervention kind" in capsys.readouterr().err
    assert main([*base, "--spec", '{"kind": "zero", "heads": [[7, 0]]}']) == 2
    assert "outside" in capsys.readouterr().err
    assert main([*base, "--spec", "missing.json"]) == 2
    assert "no such spec file" in capsys.readouterr().err
    assert main([*base, "--spec", '{"kind": "zero", "heads": [[0, 0]]}',
                 "--task-option", "bogus=1"]) == 2  # fmt: skip
    assert "task 'loss'" in capsys.readouterr().err


def test_intervene_direct_effects(tiny_llama_dir, capsys):
    code = main(["intervene", str(tiny_llama_dir), "--direct-effects", "--top-k", "3",
                 "--task", "loss", "--task-option", "n=2", "--task-option", "length=8",
                 "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "direct effects on loss" in out and len(out.strip().splitlines()) == 5


def test_intervene_knockout_curve_writes_rows_and_figure(tiny_llama_dir, tiny_model, tmp_path,
                                                        capsys):  # fmt: skip
    from workbench.scanner import scan
    from workbench.tasks import PromptSet

    prompts = PromptSet("p", ("the cat sat on the mat and the dog", "a b c d e f g a b c d"))
    run = scan(tiny_model, prompts, probes="sink", out=tmp_path / "run.h5", progress=False).path
    out, fig = tmp_path / "curve.json", tmp_path / "curve.html"
    code = main(["intervene", str(tiny_llama_dir), "--knockout-curve", "--scores", str(run),
                 "--score", "sink", "--ks", "1,2", "--controls", "2", "--task", "loss",
                 "--task-option", "n=2", "--task-option", "length=8", "--device", "cpu",
                 "--quiet", "--out", str(out), "--plot", str(fig)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-k knock-out (zero) of score 'sink' on loss" in printed and "k=2" in printed
    result = json.loads(out.read_text())
    assert [row["k"] for row in result["rows"]][:2] == [1, 2]
    assert all(len(draws) == 2 for draws in result["controls"])
    assert "plotly" in fig.read_text()


def test_knockout_and_control_errors_name_the_flags(tiny_llama_dir, capsys):
    base = ["intervene", str(tiny_llama_dir), "--task", "loss", "--task-option", "n=2",
            "--task-option", "length=8", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*base, "--knockout-curve"]) == 2
    assert "--knockout-curve needs --scores RUN, --score NAME" in capsys.readouterr().err
    every = [[layer, head] for layer in range(2) for head in range(4)]  # the whole tiny model
    assert main([*base, "--spec", json.dumps({"kind": "zero", "heads": every})]) == 2
    err = capsys.readouterr().err
    assert "no random control" in err and "pass --controls 0" in err and "control=False" not in err
