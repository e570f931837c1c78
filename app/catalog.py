"""The run files the explorer may show, and the only way a page reaches one.

A page never receives a file path from the browser. It receives a *run key*: the path of a run
file relative to the runs directory (``demo.h5``, ``smollm2/prose.h5``) or the name of a file
given on the command line (``workbench app other/x.h5``). :meth:`RunCatalog.resolve` turns a key
into a path only when the resolved file (symlinks followed) lies inside the runs directory or is
one of the named files, so ``../../etc/passwd``, absolute paths and links that point outside are
refused with :class:`RunAccessError`.

Opening goes through :func:`workbench.open_run`; a missing, unfinished, corrupt, foreign or
other-version file becomes an entry with an ``error`` (shown as an error panel), never an
exception that stops the server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import workbench
from workbench.errors import RunFileError
from workbench.models import ModelInfo

RUN_SUFFIXES = (".h5", ".hdf5")


class RunAccessError(RunFileError):
    """A run key names nothing the explorer may read (outside the runs directory, not a run)."""


@dataclass(frozen=True)
class RunSummary:
    """What the Runs page lists about one readable run file."""

    model: ModelInfo
    created: str
    scores: list[str]
    labels: list[str]
    measurements: dict[str, int]  # key -> number of items


@dataclass(frozen=True)
class RunEntry:
    key: str
    path: Path
    size: int
    summary: RunSummary | None = None
    error: str | None = None  # why the file cannot be shown

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunCatalog:
    """Run files under ``runs_dir`` plus ``named`` files (given on the command line).

    The directory is rescanned on every :meth:`entries` call (new scans appear without a
    restart); summaries are cached by (path, modification time, size).
    """

    runs_dir: Path
    named: Sequence[Path] = ()
    _named: dict[str, Path] = field(init=False, repr=False)
    _summaries: dict[tuple[Path, int, int], RunEntry] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir).expanduser().resolve()
        self._summaries = {}
        self._named = {}
        for path in self.named:
            path = Path(path).expanduser().resolve()
            key = self._inside_key(path) or path.name
            if key in self._named and self._named[key] != path:
                raise RunAccessError(
                    f"two run files are both called {key!r} ({self._named[key]} and {path}); "
                    "rename one or put them in the runs directory"
                )
            self._named[key] = path

    def _inside_key(self, path: Path) -> str | None:
        try:
            return path.relative_to(self.runs_dir).as_posix()
        except ValueError:
            return None

    def keys(self) -> list[str]:
        """Keys of every run file the explorer may show, sorted."""
        found = set(self._named)
        if self.runs_dir.is_dir():
            for path in self.runs_dir.rglob("*"):
                rel = path.relative_to(self.runs_dir)
                hidden = any(part.startswith(".") for part in rel.parts)
                if path.suffix in RUN_SUFFIXES and not hidden and path.is_file():
                    found.add(rel.as_posix())
        return sorted(found)

    def resolve(self, key: str | None) -> Path:
        """The path of run ``key``; raises :class:`RunAccessError` for anything not allowed."""
        if not key:
            raise RunAccessError("no run chosen; pick one on the Runs page")
        if key in self._named:
            return self._named[key]
        if "\x00" in key or "\\" in key or Path(key).is_absolute():
            raise RunAccessError(f"{key!r} is not a run key (a path inside the runs directory)")
        path = (self.runs_dir / key).resolve()
        if self._inside_key(path) is None or path.suffix not in RUN_SUFFIXES:
            raise RunAccessError(f"{key!r} is not a run file inside the runs directory")
        if not path.is_file():
            raise RunFileError(f"run {key!r} does not exist (any more) in {self.runs_dir}")
        return path

    @contextlib.contextmanager
    def open(self, key: str | None) -> Iterator[workbench.Run]:
        """Open run ``key`` through :func:`workbench.open_run` (errors are WorkbenchErrors)."""
        run = workbench.open_run(self.resolve(key))
        try:
            yield run
        finally:
            run.close()

    def entry(self, key: str) -> RunEntry:
        """Summary of one run, or the reason it cannot be shown."""
        try:
            path = self.resolve(key)
            stat = path.stat()
        except (RunFileError, OSError) as e:
            return RunEntry(key, Path(key), 0, error=str(e))
        cache_key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if cache_key in self._summaries:
                return self._summaries[cache_key]
        try:
            with self.open(key) as run:
                summary = RunSummary(
                    model=run.model,
                    created=str(run.attrs.get("created", "")),
                    scores=run.score_names,
                    labels=run.label_names,
                    measurements={m: run.n_items(m) for m in run.measurement_names},
                )
            entry = RunEntry(key, path, stat.st_size, summary=summary)
        except Exception as e:  # any unreadable file is shown as an error, never fatal
            message = str(e) if isinstance(e, workbench.WorkbenchError) else f"{path}: {e!r}"
            entry = RunEntry(key, path, stat.st_size, error=message)
        with self._lock:
            self._summaries[cache_key] = entry
        return entry

    def entries(self) -> list[RunEntry]:
        return [self.entry(key) for key in self.keys()]


_CURRENT: RunCatalog | None = None


def configure(catalog: RunCatalog) -> None:
    """Set the catalog the pages of this server process read."""
    global _CURRENT
    _CURRENT = catalog


def current() -> RunCatalog:
    if _CURRENT is None:
        raise RuntimeError("app.catalog.configure() was not called (use app.create_app)")
    return _CURRENT
