"""The run catalog: what the explorer may read, and how unreadable files are reported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.catalog import RunAccessError, RunCatalog
from workbench.errors import RunFileError


def test_lists_run_files_and_reports_unreadable_ones(runs_dir: Path) -> None:
    (runs_dir / ".a.h5.partial").write_bytes(b"")  # a scan in progress is not listed
    catalog = RunCatalog(runs_dir)
    assert catalog.keys() == [
        "a.h5",
        "b.h5",
        "corrupt.h5",
        "foreign.h5",
        "toy-ioi.h5",
        "toy-prose.h5",
    ]
    entries = {e.key: e for e in catalog.entries()}
    assert entries["a.h5"].ok and entries["a.h5"].summary.scores == ["entropy", "sink"]
    assert entries["a.h5"].summary.measurements == {"basic": 3}
    assert "truncated or corrupt" in entries["corrupt.h5"].error
    assert "not a workbench file" in entries["foreign.h5"].error


@pytest.mark.parametrize(
    "key",
    ["../secret.h5", "/etc/passwd", "sub/../../secret.h5", "a.h5\x00", "..\\secret.h5", ""],
)
def test_refuses_keys_outside_the_runs_directory(runs_dir: Path, key: str) -> None:
    with pytest.raises(RunAccessError):
        RunCatalog(runs_dir).resolve(key)


def test_refuses_links_that_leave_the_directory_and_non_run_files(runs_dir: Path) -> None:
    link = runs_dir / "link.h5"
    link.symlink_to(runs_dir.parent / "secret.h5")
    notes = runs_dir / "notes.txt"
    notes.write_text("not a run")
    try:
        catalog = RunCatalog(runs_dir)
        assert "link.h5" in list(catalog.keys())  # listed (it is named like a run) ...
        with pytest.raises(RunAccessError):  # ... but never opened
            catalog.resolve("link.h5")
        assert not catalog.entry("link.h5").ok
        with pytest.raises(RunAccessError):
            catalog.resolve("notes.txt")
    finally:
        os.remove(link)
        os.remove(notes)


def test_missing_file_and_named_files(runs_dir: Path, tmp_path: Path) -> None:
    catalog = RunCatalog(runs_dir, named=[runs_dir / "a.h5"])
    with pytest.raises(RunFileError, match="does not exist"):
        catalog.resolve("gone.h5")
    assert catalog.resolve("a.h5") == (runs_dir / "a.h5").resolve()
    outside = tmp_path / "elsewhere.h5"
    outside.write_bytes((runs_dir / "b.h5").read_bytes())
    named = RunCatalog(tmp_path / "empty", named=[outside])
    assert named.keys() == ["elsewhere.h5"] and named.entry("elsewhere.h5").ok
    twin = tmp_path / "other" / "elsewhere.h5"
    twin.parent.mkdir()
    twin.write_bytes(b"")
    with pytest.raises(RunAccessError, match="both called"):
        RunCatalog(tmp_path / "empty", named=[outside, twin])
