"""The run file: one HDF5 file per scan (layout in docs/run-format.md).

::

    /                     attrs: schema, schema_version, workbench_version, created,
                                 model_* (ModelInfo fields), complete
    /prompts/token_ids    [n_prompts] variable-length int32
    /prompts/texts        [n_prompts] variable-length UTF-8
                          attrs: name, hash
    /stats/<name>         [n_prompts, n_layers, n_heads] float32, attrs: definition
    /scores/<probe>       [n_layers, n_heads] float32,
                          attrs: definition, threshold, label, parameters (JSON)
    /labels/<label>       [n_layers, n_heads] bool, attrs: rule

Writes are atomic: :class:`RunWriter` writes ``.<name>.partial`` beside the target and renames it
over the target only when the scan is complete, so a stopped scan never damages the previous
file. The partial file records how many prompts are done (``n_done``), which is what a rerun
resumes from. :func:`open_run` reads lazily: opening a run reads attributes only; each table is
read when asked for.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from workbench.errors import (
    ForeignFileError,
    MissingEntryError,
    RunFileError,
    SchemaVersionError,
    ShapeError,
)
from workbench.models import ModelInfo
from workbench.scores import ScoreTable
from workbench.tasks import PromptSet

RUN_SCHEMA = "attention-head-workbench/run"
RUN_SCHEMA_VERSION = 1
UTF8 = h5py.string_dtype("utf-8")
_IDS = h5py.vlen_dtype(np.int32)


def workbench_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attention-head-workbench")
    except PackageNotFoundError:
        return "0+unknown"


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def open_h5(path: Path, schema: str, schema_version: int, mode: str = "r") -> h5py.File:
    """Open a workbench HDF5 file and check what it is, with one clear error per failure."""
    if not path.exists():
        raise RunFileError(f"no such file: {path}")
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        kind = "not an HDF5 file" if not h5py.is_hdf5(path) else "truncated or corrupt"
        raise ForeignFileError(f"{path} is {kind} ({e})") from e
    found = f.attrs.get("schema")
    if found != schema:
        f.close()
        raise ForeignFileError(f"{path} is not a workbench file of kind {schema!r}")
    version = int(f.attrs.get("schema_version", -1))
    if version != schema_version:
        f.close()
        raise SchemaVersionError(
            f"{path} has schema version {version}; this workbench reads version {schema_version} "
            "(rerun the scan with this version)"
        )
    return f


class Run:
    """A run file opened for reading. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open_h5(self.path, RUN_SCHEMA, RUN_SCHEMA_VERSION)
        try:
            if not self._f.attrs.get("complete", False):
                raise RunFileError(
                    f"{self.path} is an unfinished scan; rerun the scan to finish it"
                )
            self.model = model_info_from_attrs(self._f.attrs)
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._f.attrs.items()}

    @property
    def n_prompts(self) -> int:
        return int(self._f["prompts/texts"].shape[0])

    @property
    def prompt_set(self) -> dict[str, str]:
        a = self._f["prompts"].attrs
        return {"name": str(a["name"]), "hash": str(a["hash"])}

    def prompt_text(self, index: int) -> str:
        return self._f["prompts/texts"][index].decode()

    def token_ids(self, index: int) -> np.ndarray:
        return np.asarray(self._f["prompts/token_ids"][index])

    @property
    def stat_names(self) -> list[str]:
        return sorted(self._f["stats"].keys()) if "stats" in self._f else []

    def stat(self, name: str) -> np.ndarray:
        """``[n_prompts, n_layers, n_heads]`` float32 per-prompt statistic."""
        return self._get("stats", name)[()]

    @property
    def score_names(self) -> list[str]:
        return sorted(self._f["scores"].keys()) if "scores" in self._f else []

    def score(self, name: str) -> ScoreTable:
        d = self._get("scores", name)
        return ScoreTable.from_attrs(name, d[()], d.attrs)

    @property
    def label_names(self) -> list[str]:
        return sorted(self._f["labels"].keys()) if "labels" in self._f else []

    def label(self, name: str) -> np.ndarray:
        """``[n_layers, n_heads]`` bool."""
        return self._get("labels", name)[()].astype(bool)

    def scores_frame(self) -> pd.DataFrame:
        """One row per head: layer, head, kv_head, then one column per score."""
        layers, heads = np.indices((self.model.n_layers, self.model.n_heads))
        frame = pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel()})
        frame["kv_head"] = frame["head"] // self.model.group_size
        for name in self.score_names:
            frame[name] = self._get("scores", name)[()].ravel()
        return frame

    def _get(self, group: str, name: str) -> h5py.Dataset:
        key = f"{group}/{name}"
        if key not in self._f:
            have = ", ".join(sorted(self._f[group].keys())) if group in self._f else "none"
            raise MissingEntryError(f"{self.path} has no {group[:-1]} {name!r} (has: {have})")
        return self._f[key]

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}: {self.model.name}, {self.n_prompts} prompts, "
            f"scores {self.score_names})"
        )


def open_run(path: str | Path) -> Run:
    """Open a run file lazily (see :class:`Run`)."""
    return Run(path)


class RunWriter:
    """Writes a run into its partial file and publishes it atomically with :meth:`finish`.

    Opening a writer on a target whose partial file belongs to the same model, prompts and
    parameters resumes it: :attr:`n_done` says how many prompts are already stored.
    """

    def __init__(
        self,
        path: str | Path,
        info: ModelInfo,
        prompts: PromptSet,
        token_ids: list[np.ndarray],
        stat_definitions: dict[str, str],
        parameters: dict[str, Any],
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.info = info
        self.resumed_from = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        identity = {
            "model_config_hash": info.config_hash,
            "prompts_hash": prompts.hash,
            "parameters": json.dumps(parameters, sort_keys=True),
        }
        self._f = self._reopen(identity) if self.partial.exists() else None
        if self._f is None:
            self._f = self._create(identity, prompts, token_ids, stat_definitions)
        else:
            self.resumed_from = int(self._f.attrs["n_done"])

    @property
    def n_done(self) -> int:
        return int(self._f.attrs["n_done"])

    def _reopen(self, identity: dict[str, str]) -> h5py.File | None:
        try:
            f = open_h5(self.partial, RUN_SCHEMA, RUN_SCHEMA_VERSION, mode="r+")
        except RunFileError:
            return None  # unreadable leftovers of a killed write: start again
        if any(str(f.attrs.get(k)) != v for k, v in identity.items()):
            f.close()
            return None
        return f

    def _create(
        self,
        identity: dict[str, str],
        prompts: PromptSet,
        token_ids: list[np.ndarray],
        stat_definitions: dict[str, str],
    ) -> h5py.File:
        f = h5py.File(self.partial, "w")
        f.attrs.update(
            {
                "schema": RUN_SCHEMA,
                "schema_version": RUN_SCHEMA_VERSION,
                "workbench_version": workbench_version(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "complete": False,
                "n_done": 0,
                **identity,
                **{f"model_{k}": v for k, v in self.info.to_dict().items()},
            }
        )
        group = f.create_group("prompts")
        group.attrs.update({"name": prompts.name, "hash": prompts.hash})
        group.create_dataset("texts", data=list(prompts.texts), dtype=UTF8)
        ids = group.create_dataset("token_ids", (len(token_ids),), dtype=_IDS)
        for i, t in enumerate(token_ids):
            ids[i] = np.asarray(t, dtype=np.int32)
        shape = (len(prompts), self.info.n_layers, self.info.n_heads)
        for name, definition in stat_definitions.items():
            d = f.create_dataset(f"stats/{name}", shape, dtype=np.float32, fillvalue=np.nan)
            d.attrs["definition"] = definition
        f.flush()
        return f

    def write_stats(self, start: int, stats: list[dict[str, np.ndarray]]) -> None:
        """Store per-prompt statistics for prompts ``start .. start+len(stats)`` and mark them done.

        ``stats[i][name]`` is ``[n_layers, n_heads]``.
        """
        if start != self.n_done:
            raise ValueError(
                f"prompts must be written in order: next is {self.n_done}, got {start}"
            )
        for name in self._f["stats"]:
            block = np.stack([s[name] for s in stats])  # [batch, n_layers, n_heads]
            self._f[f"stats/{name}"][start : start + len(stats)] = block
        # n_done moves only after the data is flushed: a kill in between costs one batch, never
        # a half-written one counted as done.
        self._f.flush()
        self._f.attrs["n_done"] = start + len(stats)
        self._f.flush()

    def stats(self) -> dict[str, np.ndarray]:
        """All stored statistics ``{name: [n_done, n_layers, n_heads]}``."""
        return {name: d[: self.n_done] for name, d in self._f["stats"].items()}

    def write_score(self, table: ScoreTable) -> None:
        expected = (self.info.n_layers, self.info.n_heads)
        if table.values.shape != expected:
            raise ShapeError(
                f"score {table.name!r} must be [n_layers, n_heads] = {expected}, "
                f"got {table.values.shape}"
            )
        key = f"scores/{table.name}"
        if key in self._f:
            del self._f[key]
        d = self._f.create_dataset(key, data=table.values)
        d.attrs.update(table.attrs())

    def write_label(self, name: str, mask: np.ndarray, rule: str) -> None:
        key = f"labels/{name}"
        if key in self._f:
            del self._f[key]
        d = self._f.create_dataset(key, data=np.asarray(mask, dtype=bool))
        d.attrs["rule"] = rule

    def finish(self) -> Path:
        """Mark complete and atomically replace the target file."""
        self._f.attrs["complete"] = True
        self._f.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without publishing (the partial file stays for a resume)."""
        if self._f.id.valid:
            self._f.close()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def model_info_from_attrs(attrs: Any) -> ModelInfo:
    fields = ModelInfo.__dataclass_fields__
    try:
        return ModelInfo(**{k: _plain(attrs[f"model_{k}"]) for k in fields})
    except KeyError as e:
        raise RunFileError(f"run file lacks model identity attribute {e}") from e
