"""Atomic file writes: build the new file (or directory) beside its target, then rename it.

A reader never sees a half-written file, and a failed or interrupted write leaves the previous
file (if any) untouched: the rename is the only step that touches the target, and a rename within
one directory is atomic on POSIX file systems. The temporary name starts with a dot and is unique
(``.<name>.<random>.tmp``), so two writers of one target never share a temporary file, and
listings that skip dot files never show it.

* :func:`atomic_write_text` -- a text file in one call;
* :func:`atomic_path` -- any file a library writes by path (HDF5, a copy that is then edited);
* :func:`atomic_dir` -- a directory built file by file (a saved checkpoint).

Run files are the one exception: a scan writes ``.<name>.partial`` under a fixed name, because a
rerun resumes from it (:class:`workbench.store.RunWriter`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def _sibling(path: Path) -> Path:
    """A fresh, unused name in ``path``'s directory (created with it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; when the block ends
    without an error it is renamed over ``path``, otherwise it is deleted.

    The temporary file does not exist yet: the caller creates it (so it gets the permissions of
    any new file)::

        with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
            f["x"] = data
    """
    tmp = _sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def atomic_dir(path: Path, *, replace: bool) -> Iterator[Path]:
    """Yield a new empty directory beside ``path`` to fill; when the block ends without an
    error it becomes ``path``, otherwise it is deleted.

    A directory that exists at ``path`` by then is deleted first (``replace=True``), or kept
    and the new one discarded (``replace=False``: another process built the same thing
    first). Deleting and renaming are two steps, so with ``replace=True`` a reader may briefly
    find no directory, but never a partial one.
    """
    tmp = _sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
