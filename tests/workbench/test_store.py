import dataclasses

import h5py
import numpy as np
import pytest

from workbench.errors import (
    CorruptFileError,
    ForeignFileError,
    MissingEntryError,
    RunFileError,
    RunMismatchError,
    SchemaVersionError,
    ShapeError,
)
from workbench.scores import ScoreTable
from workbench.store import MODEL_IDENTITY, RunWriter, check_run_model, open_run, partial_path

TEXTS = ["one", "two", "three"]
IDS = [np.arange(3), np.arange(4), np.arange(2)]
DEFS = {"first_token_mass": "def a", "entropy": "def b"}


def _items(info, values):
    shape = (info.n_layers, info.n_heads)
    return [{name: np.full(shape, v, np.float32) for name in DEFS} for v in values]


def _complete_run(path, info):
    w = RunWriter(path, info, {"k": 1})
    w.measurement("basic", TEXTS, IDS, DEFS).write(0, _items(info, range(3)))
    values = np.arange(info.n_layers * info.n_heads, dtype=np.float32)
    table = ScoreTable(
        "sink",
        values.reshape(info.n_layers, info.n_heads),
        "a definition",
        threshold=3.5,
        label="sink",
        parameters={"epsilon": 0.3},
    )
    w.write_score(table)
    w.write_label("sink", table.selected, "sink > 3.5")
    return w.finish()


def test_roundtrip(tmp_path, tiny_model):
    info = tiny_model.info
    path = _complete_run(tmp_path / "run.h5", info)
    assert not partial_path(path).exists()
    with open_run(path) as run:
        assert run.model == info
        assert run.measurement_names == ["basic"] and run.n_items("basic") == 3
        assert run.prompt_text("basic", 1) == "two"
        assert run.token_ids("basic", 1).tolist() == [0, 1, 2, 3]
        assert run.stat_names("basic") == ["entropy", "first_token_mass"]
        assert run.stat("basic", "entropy").shape == (3, info.n_layers, info.n_heads)
        assert run.stat("basic", "entropy")[2, 0, 0] == 2
        table = run.score("sink")
        assert table.threshold == 3.5 and table.parameters == {"epsilon": 0.3}
        assert run.label("sink").sum() == info.n_layers * info.n_heads - 4
        assert list(run.scores_frame().columns) == ["layer", "head", "kv_head", "sink"]
        assert run.attrs["schema_version"] == 2
        with pytest.raises(MissingEntryError, match="has no score 'nope'"):
            run.score("nope")
        with pytest.raises(MissingEntryError, match="has no stat 'nope'"):
            run.stat("basic", "nope")


def test_score_shape_is_checked(tmp_path, tiny_model):
    w = RunWriter(tmp_path / "r.h5", tiny_model.info, {})
    with pytest.raises(ShapeError, match=r"must be \[n_layers, n_heads\] = \(2, 4\)"):
        w.write_score(ScoreTable("x", np.zeros((3, 4)), "d"))
    w.close()


def test_resume_only_with_same_identity(tmp_path, tiny_model):
    info = tiny_model.info
    w = RunWriter(tmp_path / "r.h5", info, {"k": 1})
    w.measurement("basic", TEXTS, IDS, DEFS).write(0, _items(info, [0]))
    w.close()
    w = RunWriter(tmp_path / "r.h5", info, {"k": 1})
    group = w.measurement("basic", TEXTS, IDS, DEFS)
    assert group.n_done == 1 and group.stats()["entropy"].shape == (1, 2, 4)
    with pytest.raises(ValueError, match="next is 1, not 0"):
        group.write(0, _items(info, [0]))
    assert w.measurement("basic", ["other", "inputs", "now"], IDS, DEFS).n_done == 0
    w.close()
    w = RunWriter(tmp_path / "r.h5", info, {"k": 2})  # other parameters: start again
    assert "basic" not in w._f["measurements"]
    w.close()


def test_unreadable_partial_is_started_again(tmp_path, tiny_model):
    partial_path(tmp_path / "r.h5").write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    w = RunWriter(tmp_path / "r.h5", tiny_model.info, {})
    assert w.measurement("basic", TEXTS, IDS, DEFS).n_done == 0
    w.close()


def test_bad_files(tmp_path, tiny_model):
    with pytest.raises(RunFileError, match="no such file"):
        open_run(tmp_path / "missing.h5")
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(ForeignFileError, match="not an HDF5 file"):
        open_run(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(
        ForeignFileError, match="not a workbench file .an HDF5 file without the workbench seal"
    ):
        open_run(foreign)
    good = _complete_run(tmp_path / "good.h5", tiny_model.info)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="truncated or corrupt: its content does not match"):
        open_run(truncated)
    with h5py.File(good, "r+") as f:  # an edit behind the workbench's back breaks the seal
        f.attrs["schema_version"] = 99
    with pytest.raises(CorruptFileError, match="truncated or corrupt: its content does not match"):
        open_run(good)
    other = _complete_run(tmp_path / "other.h5", tiny_model.info)
    data = bytearray(other.read_bytes())
    data[: len(b"attention-head-workbench/run 2")] = b"attention-head-workbench/run 9"
    other.write_bytes(bytes(data))
    with pytest.raises(SchemaVersionError, match="schema version 9"):
        open_run(other)


def test_unfinished_run_is_refused(tmp_path, tiny_model):
    RunWriter(tmp_path / "r.h5", tiny_model.info, {}).close()
    with pytest.raises(RunFileError, match="unfinished scan"):
        open_run(partial_path(tmp_path / "r.h5"))


def test_run_model_check_compares_every_identity_field(tiny_model):
    info = tiny_model.info
    check_run_model(info, info)  # the same model
    check_run_model(info, dataclasses.replace(info, revision="elsewhere", max_context=7))
    check_run_model(info, {"name": info.name, "n_kv_heads": info.n_kv_heads})  # asserted fields
    for field in MODEL_IDENTITY:
        other = dataclasses.replace(info, **{field: getattr(info, field) * 2})
        with pytest.raises(RunMismatchError, match=rf"\({MODEL_IDENTITY[field]} differs\)$"):
            check_run_model(info, other, "r.h5")
    other = dataclasses.replace(info, name="other", config_hash="0" * 16)
    with pytest.raises(RunMismatchError) as error:
        check_run_model(info, other, "r.h5")
    assert str(error.value) == (
        f"r.h5 was made with tiny-llama (2 layers x 4 heads, 2 KV heads, config hash "
        f"{info.config_hash}), not with other (2 layers x 4 heads, 2 KV heads, config hash "
        f"{'0' * 16}) (name, config hash differ)"
    )
    with pytest.raises(RunMismatchError, match=r"not with llama \(name differs\)$"):
        check_run_model(info, {"name": "llama"}, "r.h5")
