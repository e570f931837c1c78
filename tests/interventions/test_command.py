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
