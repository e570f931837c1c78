"""Atomic file writes: build the new file (or directory) beside its target, then rename it.

A reader never sees a half-written file, and a failed or interrupted write leaves the previous
file (if any) untouched: the rename is the only step that touches the target, and a rename within
one directory is atomic on POSIX file systems. The temporary name starts with a dot and is unique
(``.<name>.<random>.tmp``), so two writers of one target never share a temporary file, and
listings that skip dot files never show it.

* :func:`atomic_write_text` -- a text file in one call;
* :func:`atomic_path` -- any file a library writes by path (HDF5, a copy that is then edited);
* :func:`atomic_dir` -- a directory built file by file (a saved checkpoint);
* :func:`atomic_files` -- several files that belong together (an export format of two files):
  all are written before any replaces its target;
* :func:`writer_lock` -- one writer per target: a second process gets a one-line refusal that
  names the lock file and the process holding it;
* :func:`check_output` -- whether a file or directory can be written at a path, asked before
  any work starts (the CLI's output arguments and the run writer ask it).

Run files are the one exception: a scan writes ``.<name>.partial`` under a fixed name, because a
rerun resumes from it (:class:`workbench.store.RunWriter`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from workbench.errors import OutputError, OutputLockedError


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


def atomic_files(directory: Path, files: Mapping[str, str]) -> list[Path]:
    """Write text files ``{name: text}`` (UTF-8) into ``directory`` as one set; returns their
    paths.

    Every file is written into a temporary directory beside ``directory`` first, so a failure
    while writing (a full disk, an unwritable target) leaves the previous set as it was. A new
    ``directory`` then appears whole, by one rename; into an existing one (which may hold other
    files) each file moves by its own rename, all of them after the last write.
    """
    with atomic_dir(directory, replace=False) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if directory.exists():  # keep the directory's other files: move ours in one by one
            blocked = [name for name in files if (directory / name).is_dir()]
            if blocked:
                raise OutputError(f"{directory / blocked[0]} is a directory, not a file")
            for name in files:
                os.replace(tmp / name, directory / name)
    return [directory / name for name in files]


def lock_path(path: Path) -> Path:
    """The lock file of ``path``'s writer: ``.<name>.lock`` beside it."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[Path]:
    """Hold the lock of ``path``'s only writer for the block (yields the lock file).

    The lock is an advisory ``flock`` on ``.<name>.lock`` beside ``path``; the file holds the
    owner's process id and is removed when the block ends. The kernel releases the lock of a
    killed process, so a stale file never blocks a rerun. Raises
    :class:`~workbench.errors.OutputLockedError` at once (no waiting) when another process
    holds it.
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(
                f"{path} is being written by another process (pid {owner} holds {lock}); "
                "wait for it to finish, or stop it and rerun"
            ) from None
        # the previous holder may have removed the file between our open and our lock: then we
        # hold a lock on a file nobody else will see, and must take the one at the path
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def check_output(path: Path, *, directory: bool = False) -> Path:
    """``path`` if a file (``directory=False``) or a directory could be written there now;
    otherwise :class:`~workbench.errors.OutputError` saying why: a directory where the file
    goes (or a file where the directory goes), a file where a parent directory goes, or a
    directory this process cannot write in (tried with a nameless temporary file, so nothing is
    left behind)."""
    what = "directory" if directory else "file"
    if path.exists() and path.is_dir() != directory:
        other = "a directory" if path.is_dir() else "a file"
        raise OutputError(f"{path} is {other}; give a {what} path")
    place = path if directory and path.is_dir() else path.parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise OutputError(f"cannot write the {what} {path}: {place} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise OutputError(f"cannot write the {what} {path}: {place}: {e.strerror}") from None
    return path
