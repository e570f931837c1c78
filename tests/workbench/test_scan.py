import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from workbench import capture
from workbench.scanner import scan
from workbench.store import open_run, partial_path


def test_pattern_statistics_match_hook_pattern(tiny_model):
    ids = tiny_model.tokenize("when mary and john went to the store john gave a drink to mary")
    stats = capture.head_statistics(tiny_model, ids, path="pattern")
    _, cache = tiny_model.bridge().run_with_cache(ids[None])
    for layer in range(tiny_model.info.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, q_pos, k_pos]
        np.testing.assert_allclose(
            stats["first_token_mass"][layer], pattern[:, :, 0].mean(-1), atol=1e-6
        )
        np.testing.assert_allclose(
            stats["max_prob"][layer], pattern.max(-1).values.mean(-1), atol=1e-6
        )
        entropy = -(pattern * pattern.clamp_min(1e-30).log()).sum(-1)  # [head, q_pos]
        np.testing.assert_allclose(stats["entropy"][layer], entropy.mean(-1), atol=1e-5)
        visible = torch.arange(1, len(ids) + 1, dtype=torch.float32)
        normalized = (entropy[:, 1:] / visible[1:].log()).mean(-1)
        np.testing.assert_allclose(stats["normalized_entropy"][layer], normalized, atol=1e-5)


def test_capture_rejects_bad_shapes(tiny_model):
    with pytest.raises(ValueError, match=r"non-empty \[seq\]"):
        capture.head_statistics(tiny_model, torch.zeros(1, 3, dtype=torch.long))


def test_scan_in_memory_and_on_disk_agree(tiny_model, prompt_file, tmp_path):
    memory = scan(tiny_model, str(prompt_file), progress=False)
    disk = scan(tiny_model, str(prompt_file), out=tmp_path / "run.h5", batch_size=2, progress=False)
    assert {"sink", "entropy", "hidden_sink", "value_drain", "residual_peak"} <= set(memory.tables)
    for name in memory.tables:
        np.testing.assert_allclose(memory.tables[name].values, disk.tables[name].values)
    with open_run(disk.path) as run:
        np.testing.assert_allclose(run.score("sink").values, memory.tables["sink"].values)
        sink = memory.tables["sink"]
        assert run.label("sink").tolist() == sink.selected.tolist()
        assert run.tentative("sink").tolist() == sink.tentative.tolist()
        assert (run.label("sink") | run.tentative("sink")).tolist() == (sink.values > 0.3).tolist()
        np.testing.assert_array_equal(run.score("sink").interval.low, sink.interval.low)
    assert len(memory.scores) == 8 and "sink" in memory.scores.columns
    assert memory.heatmap("sink").data[0].z.shape == (2, 4)
    assert "heads labelled 'sink'" in memory.summary()


def test_interrupted_scan_keeps_old_file_and_resumes(
    tiny_model, prompt_file, tmp_path, monkeypatch
):
    out = tmp_path / "run.h5"
    reference = scan(tiny_model, str(prompt_file), out=out, batch_size=2, progress=False)
    before = out.read_bytes()
    real, calls = capture.head_statistics, []

    def stop_at_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("probes.basic.head_statistics", stop_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, str(prompt_file), out=out, batch_size=2, probes="sink", progress=False)
    assert out.read_bytes() == before and partial_path(out).exists()
    monkeypatch.setattr("probes.basic.head_statistics", real)
    resumed = scan(
        tiny_model, str(prompt_file), out=out, batch_size=2, probes="sink", progress=False
    )
    assert not partial_path(out).exists()
    np.testing.assert_allclose(resumed.tables["sink"].values, reference.tables["sink"].values)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import probes.basic as s
    real, calls = s.head_statistics, []
    def die_at_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    s.head_statistics = die_at_fourth
    from workbench.cli import main
    main(sys.argv[1:])
    """
)


@pytest.mark.slow
def test_killed_cli_scan_resumes(tiny_llama_dir, prompt_file, tmp_path):
    out = tmp_path / "run.h5"
    args = [
        "scan",
        str(tiny_llama_dir),
        "--prompts",
        str(prompt_file),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True)
    assert killed.returncode == -9 and not out.exists() and partial_path(out).exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "workbench", *args], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {out} (basic) after item 3/5" in rerun.stderr
    assert f"run file: {out}" in rerun.stdout
    fresh = tmp_path / "fresh.h5"
    args[args.index(str(out))] = str(fresh)
    subprocess.run(
        [sys.executable, "-m", "workbench", *args], env=env, check=True, capture_output=True
    )
    with open_run(out) as a, open_run(fresh) as b:
        np.testing.assert_allclose(
            a.stat("basic", "entropy"), b.stat("basic", "entropy"), atol=1e-6
        )
        np.testing.assert_allclose(a.score("sink").values, b.score("sink").values, atol=1e-6)
