"""Atomic writes: the target changes only by a rename; a failure leaves it and no temp file."""

import stat

import pytest

from workbench.atomic import atomic_dir, atomic_path, atomic_write_text


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_text_replaces_the_target_with_the_permissions_of_a_plain_write(tmp_path):
    target = tmp_path / "sub" / "a.json"
    assert atomic_write_text(target, "one") == target
    atomic_write_text(target, "two ✓")
    assert target.read_text(encoding="utf-8") == "two ✓"
    plain = tmp_path / "sub" / "plain.json"
    plain.write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert _names(target.parent) == ["a.json", "plain.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.h5"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.h5.") and not tmp.exists()
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and _names(tmp_path) == ["a.h5"]
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second  # two writers never share a temporary file
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first" and _names(tmp_path) == ["a.h5"]


@pytest.mark.parametrize("replace", [True, False])
def test_directory_is_built_aside_then_renamed(tmp_path, replace):
    target = tmp_path / "model"
    with atomic_dir(target, replace=replace) as tmp:
        (tmp / "weights").write_text("1")
        assert not target.exists()
    assert (target / "weights").read_text() == "1"
    with atomic_dir(target, replace=replace) as tmp:
        (tmp / "weights").write_text("2")
    assert (target / "weights").read_text() == ("2" if replace else "1")
    with pytest.raises(RuntimeError), atomic_dir(target, replace=replace) as tmp:
        (tmp / "weights").write_text("3")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == ("2" if replace else "1")
    assert _names(tmp_path) == ["model"]
