import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from workbench import distributed
from workbench.errors import DistributedError, RunFileError, RunMismatchError
from workbench.models import load
from workbench.scanner import scan
from workbench.store import RunWriter, open_run, partial_path

STAT = {"x": "a [n_layers, n_heads] statistic"}
# one shared measurement, and the streamed path (no TransformerLens import in every process),
# keep the multi-process tests short
PROBES, PATH = "sink,entropy", "streamed"


def _torchrun(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on the CPU (gloo), running the CLI or ``script``."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    target = ["-m", "workbench"] if script is None else [script]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    return subprocess.run(
        [*command, "2", *target, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _scan_args(model_dir, prompt_file, out) -> list[str]:
    return [
        "scan",
        str(model_dir),
        "--prompts",
        str(prompt_file),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "1",
        "--probes",
        PROBES,
        "--path",
        PATH,
        "--quiet",
    ]


def _assert_same_run(a_path, b_path) -> None:
    with open_run(a_path) as a, open_run(b_path) as b:
        assert a.measurement_names == b.measurement_names and a.score_names == b.score_names
        assert a.attrs["parameters"] == b.attrs["parameters"]
        for key in a.measurement_names:
            assert a.n_items(key) == b.n_items(key)
            for i in range(a.n_items(key)):
                assert a.prompt_text(key, i) == b.prompt_text(key, i)
            for name in a.stat_names(key):  # per item: a misplaced item would show here
                np.testing.assert_allclose(a.stat(key, name), b.stat(key, name), atol=1e-6)
        for name in a.score_names:
            np.testing.assert_allclose(a.score(name).values, b.score(name).values, atol=1e-6)
        assert a.label_names == b.label_names


def _part(out, info, rank, items, values, texts, *, done=True, key="m"):
    """A rank's part file holding ``items`` of a 5-item measurement, as scan_shards writes it."""
    writer = RunWriter(distributed.part_file(out, rank, 2), info, {"part": rank})
    group = writer.measurement(
        key,
        [texts[i] for i in items],
        [np.array([i]) for i in items],
        STAT,
        item_index=items,
    )
    stored = items if done else items[:1]
    group.write(0, [{"x": values[i]} for i in stored])
    writer.close()
    return partial_path(distributed.part_file(out, rank, 2))


def test_merge_fills_each_item_from_its_rank(tiny_model, tmp_path):
    info, out = tiny_model.info, tmp_path / "run.h5"
    texts = [f"prompt {i}" for i in range(5)]
    values = np.arange(5 * 8, dtype=np.float32).reshape(5, 2, 4)  # item i: [n_layers, n_heads]
    shares = [distributed.Ranks(r, 2).items(5) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    parts = [_part(out, info, r, shares[r], values, texts) for r in range(2)]

    writer = RunWriter(out, info, {})
    group = writer.measurement("m", texts, [np.array([i]) for i in range(5)], STAT)
    group.merge(parts)
    assert group.n_done == 5
    np.testing.assert_array_equal(group.stats()["x"], values)
    writer.close()

    writer = RunWriter(tmp_path / "other.h5", info, {})
    group = writer.measurement("m", texts, [np.array([i]) for i in range(5)], STAT)
    with pytest.raises(RunFileError, match="cover 3/5 items"):
        group.merge(parts[:1])
    with pytest.raises(RunMismatchError, match="repeats items"):
        group.merge([parts[0], parts[0]])
    changed = _part(tmp_path / "changed.h5", info, 0, shares[0], values, ["?", *texts[1:]])
    with pytest.raises(RunMismatchError, match="other inputs"):
        group.merge([changed, parts[1]])
    unfinished = _part(tmp_path / "unfinished.h5", info, 1, shares[1], values, texts, done=False)
    with pytest.raises(RunFileError, match="1/2 items .* rerun the scan"):
        group.merge([parts[0], unfinished])
    foreign = _part(tmp_path / "foreign.h5", info, 0, shares[0], values, texts, key="other")
    with pytest.raises(RunFileError, match="no part of measurement 'm'"):
        group.merge([foreign, parts[1]])
    writer.close()


def test_torchrun_scan_matches_single_process(tiny_llama_dir, tiny_model, prompt_file, tmp_path):
    single = scan(
        tiny_model,
        str(prompt_file),
        probes=PROBES,
        path=PATH,
        out=tmp_path / "single.h5",
        progress=False,
    )
    out = tmp_path / "ranks.h5"
    done = _torchrun(*_scan_args(tiny_llama_dir, prompt_file, out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"run file: {out}") == 1  # rank 0 alone reports
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["prompts.jsonl", "ranks.h5", "ranks.html", "single.h5"]  # rank 0 alone writes
    _assert_same_run(out, single.path)


KILL_RANK_1 = textwrap.dedent(
    """
    import os, signal, sys
    import probes.basic as basic
    real, calls = basic.head_statistics, []
    def die_on_second_item(*args, **kwargs):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    basic.head_statistics = die_on_second_item
    from workbench.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_killed_rank_leaves_its_part_and_the_rerun_resumes(
    tiny_llama_dir, tiny_model, prompt_file, tmp_path
):
    out = tmp_path / "run.h5"
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_RANK_1)
    killed = _torchrun(*_scan_args(tiny_llama_dir, prompt_file, out), script=str(killer))
    assert killed.returncode != 0 and not out.exists()
    part = partial_path(distributed.part_file(out, 1, 2))
    with h5py.File(part, "r") as f:  # rank 1's first item (prompt 1) survived the kill
        assert f["measurements/basic"].attrs["n_done"] == 1
        assert f["measurements/basic/item_index"][()].tolist() == [1, 3]

    rerun = _torchrun(*_scan_args(tiny_llama_dir, prompt_file, out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"rank 1: resuming {out} (basic) after item 1/2 of this rank" in rerun.stderr
    assert not part.exists() and not partial_path(distributed.part_file(out, 0, 2)).exists()
    single = scan(
        tiny_model,
        str(prompt_file),
        probes=PROBES,
        path=PATH,
        out=tmp_path / "single.h5",
        progress=False,
    )
    _assert_same_run(out, single.path)


def _gloo_worker(rank: int, init_file: str, model_dir: str, prompt_file: str, result: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    torch.distributed.init_process_group("gloo", f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = load(model_dir, device="cpu")
        tokenizer, tokenized = model.tokenizer, []

        def counting(text, **kwargs):
            tokenized.append(text)
            return tokenizer(text, **kwargs)

        model.tokenizer = counting
        memory = scan(model, prompt_file, probes=PROBES, path=PATH, progress=False)
        model.tokenizer = tokenizer
        if rank == 1:  # a rank that fails while measuring must not leave rank 0 waiting
            import probes.basic

            probes.basic.head_statistics = lambda *a, **k: (_ for _ in ()).throw(
                ValueError("broken prompt")
            )
        try:
            scan(model, prompt_file, probes=PROBES, path=PATH, progress=False)
            failure = None
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
        tables = {name: t.values.tolist() for name, t in memory.tables.items()}
        with open(f"{result}.{rank}", "w") as f:
            json.dump({"tables": tables, "failure": failure, "tokenized": len(tokenized)}, f)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_in_memory_scan_over_two_gloo_ranks(tiny_llama_dir, tiny_model, prompt_file, tmp_path):
    result = tmp_path / "result"
    args = (str(tmp_path / "init"), str(tiny_llama_dir), str(prompt_file), str(result))
    mp.start_processes(_gloo_worker, args=args, nprocs=2, start_method="spawn", join=True)
    single = scan(tiny_model, str(prompt_file), probes=PROBES, path=PATH, progress=False)
    outcomes = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in range(2)]
    for outcome in outcomes:  # every rank returns every table
        assert outcome["tables"].keys() == single.tables.keys()
        for name, table in single.tables.items():
            np.testing.assert_allclose(outcome["tables"][name], table.values, atol=1e-6)
    assert [o["tokenized"] for o in outcomes] == [3, 2]  # each rank tokenizes its share once
    assert outcomes[1]["failure"] == "ValueError: broken prompt"
    assert outcomes[0]["failure"].startswith(DistributedError.__name__)
    assert "rank 1 failed (ValueError: broken prompt)" in outcomes[0]["failure"]


def test_rank_device_refuses_more_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DistributedError, match="at most 2 processes per node"):
        distributed.rank_device(distributed.Ranks(rank=2, world_size=4, local_rank=2), None)
    assert distributed.rank_device(distributed.Ranks(), None) is None
    assert distributed.rank_device(distributed.Ranks(1, 2, 1), "cpu") == "cpu"


def test_cli_device_map_option(capsys):
    from workbench.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["scan", "m", "--device-map", "auto"]).device_map == "auto"
    layout = parse(["scan", "m", "--device-map", '{"model.layers.0": 0, "lm_head": 1}'])
    assert layout.device_map == {"model.layers.0": 0, "lm_head": 1}
    for bad in (["--device-map", "everywhere"], ["--device-map", "auto", "--device", "cpu"]):
        with pytest.raises(SystemExit):
            parse(["scan", "m", *bad])
    assert "not allowed with argument" in capsys.readouterr().err
