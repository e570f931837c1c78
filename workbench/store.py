"""The run file: one HDF5 file per scan (layout in docs/run-format.md).

::

    /                               attrs: schema, schema_version, workbench_version, created,
                                           model_* (ModelInfo fields), parameters, complete
    /measurements/<key>/            attrs: inputs_hash, n_items, n_done
    /measurements/<key>/texts       [n_items] UTF-8 (the prompt of each item)
    /measurements/<key>/token_ids   [n_items] variable-length int32
    /measurements/<key>/item_index  [n_items] int64, part files of data-parallel scans only
    /measurements/<key>/stats/<s>   [n_items, ...] float32, attrs: definition
    /scores/<name>                  [n_layers, n_heads] float32,
                                    attrs: definition, threshold, label, parameters (JSON)
    /labels/<label>                 [n_layers, n_heads] bool, attrs: rule
    /circuits/<name>                UTF-8 JSON of a circuit (interventions.circuit.Circuit)

A *measurement* is one set of inputs (the scan's prompts, needle trials, a text domain...) and
the per-item statistics a probe computed on them. Writes are atomic: :class:`RunWriter` writes
``.<name>.partial`` beside the target and renames it over the target only when the scan is
complete, so a stopped scan never damages the previous file. Each measurement records how many
items are done (``n_done``), which is what a rerun resumes from. :func:`open_run` reads lazily:
opening a run reads attributes only; each table is read when asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from workbench.atomic import atomic_path
from workbench.errors import (
    ForeignFileError,
    MissingEntryError,
    RunFileError,
    RunMismatchError,
    SchemaVersionError,
    ShapeError,
)
from workbench.models import ModelInfo
from workbench.scores import ScoreTable

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
    def measurement_names(self) -> list[str]:
        return sorted(self._f["measurements"].keys()) if "measurements" in self._f else []

    def n_items(self, measurement: str) -> int:
        return int(self._get("measurements", measurement).attrs["n_items"])

    def prompt_text(self, measurement: str, index: int) -> str:
        return self._get("measurements", measurement)["texts"][index].decode()

    def token_ids(self, measurement: str, index: int) -> np.ndarray:
        return np.asarray(self._get("measurements", measurement)["token_ids"][index])

    def stat_names(self, measurement: str) -> list[str]:
        group = self._get("measurements", measurement)
        return sorted(group["stats"].keys()) if "stats" in group else []

    def stat(self, measurement: str, name: str) -> np.ndarray:
        """``[n_items, ...]`` float32 per-item statistic of a measurement."""
        return self._get(f"measurements/{measurement}/stats", name)[()]

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

    @property
    def circuit_names(self) -> list[str]:
        return sorted(self._f["circuits"].keys()) if "circuits" in self._f else []

    def circuit(self, name: str) -> str:
        """The JSON text of a stored circuit (``interventions.circuit.Circuit.from_run`` parses
        it)."""
        return self._get("circuits", name)[()].decode()

    def scores_frame(self) -> pd.DataFrame:
        """One row per head: layer, head, kv_head, then one column per score."""
        layers, heads = np.indices((self.model.n_layers, self.model.n_heads))
        frame = pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel()})
        frame["kv_head"] = frame["head"] // self.model.group_size
        for name in self.score_names:
            frame[name] = self._get("scores", name)[()].ravel()
        return frame

    def _get(self, group: str, name: str) -> Any:
        key = f"{group}/{name}"
        if key not in self._f:
            have = ", ".join(sorted(self._f[group].keys())) if group in self._f else "none"
            kind = group.rsplit("/", 1)[-1].removesuffix("s")
            raise MissingEntryError(f"{self.path} has no {kind} {name!r} (has: {have})")
        return self._f[key]

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}: {self.model.name}, measurements "
            f"{self.measurement_names}, scores {self.score_names})"
        )


def open_run(path: str | Path) -> Run:
    """Open a run file lazily (see :class:`Run`)."""
    return Run(path)


# The fields that say which model a run was made with. The config hash covers the architecture;
# the name tells apart checkpoints that share one config (a quantized file and its original).
MODEL_IDENTITY = {  # field -> how a message calls it
    "name": "name",
    "n_layers": "layer count",
    "n_heads": "head count",
    "n_kv_heads": "KV head count",
    "config_hash": "config hash",
}


def check_run_model(
    run: ModelInfo, model: ModelInfo | Mapping[str, Any], where: str | Path = "the run"
) -> None:
    """Raise :class:`RunMismatchError` unless a run (``run``: its model identity, ``Run.model``)
    was made with ``model``.

    ``model`` is the :class:`ModelInfo` of a loaded model (or of another run file), or only the
    fields a user asserted, e.g. ``{"name": "smollm2-135m"}`` for ``workbench export --model``:
    the fields of :data:`MODEL_IDENTITY` it holds must all be equal. The message names both
    models and what differs, ``where`` names the run (its path, usually)::

        runs/a.h5 was made with tiny-llama (2 layers x 4 heads, 2 KV heads, config hash
        9f1c...), not with llama (name differs)
    """
    wanted = model.to_dict() if isinstance(model, ModelInfo) else dict(model)
    differ = [k for k in MODEL_IDENTITY if k in wanted and wanted[k] != getattr(run, k)]
    if differ:
        fields = ", ".join(MODEL_IDENTITY[k] for k in differ)
        raise RunMismatchError(
            f"{where} was made with {_describe_model(run.to_dict())}, not with "
            f"{_describe_model(wanted)} ({fields} differ{'s' if len(differ) == 1 else ''})"
        )


def _describe_model(fields: Mapping[str, Any]) -> str:
    """``name (L layers x H heads, KV KV heads, config hash X)``, with the fields given."""
    details = []
    if "n_layers" in fields or "n_heads" in fields:
        details.append(f"{fields.get('n_layers', '?')} layers x {fields.get('n_heads', '?')} heads")
    if "n_kv_heads" in fields:
        details.append(f"{fields['n_kv_heads']} KV heads")
    if "config_hash" in fields:
        details.append(f"config hash {fields['config_hash']}")
    if "name" not in fields:
        return ", ".join(details)
    return f"{fields['name']} ({', '.join(details)})" if details else str(fields["name"])


class RunWriter:
    """Writes a run into its partial file and publishes it atomically with :meth:`finish`.

    Opening a writer on a target whose partial file belongs to the same model and parameters
    resumes it; each :meth:`measurement` then says how many of its items are already done.
    """

    def __init__(self, path: str | Path, info: ModelInfo, parameters: dict[str, Any]) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.info = info
        self.path.parent.mkdir(parents=True, exist_ok=True)
        identity = {
            "model_config_hash": info.config_hash,
            "parameters": json.dumps(parameters, sort_keys=True),
        }
        self._f = self._reopen(identity) if self.partial.exists() else None
        if self._f is None:
            self._f = self._create(identity)

    def _reopen(self, identity: dict[str, str]) -> h5py.File | None:
        try:
            f = open_h5(self.partial, RUN_SCHEMA, RUN_SCHEMA_VERSION, mode="r+")
        except RunFileError:
            return None  # unreadable leftovers of a killed write: start again
        if any(str(f.attrs.get(k)) != v for k, v in identity.items()):
            f.close()
            return None
        return f

    def _create(self, identity: dict[str, str]) -> h5py.File:
        f = h5py.File(self.partial, "w")
        f.attrs.update(
            {
                "schema": RUN_SCHEMA,
                "schema_version": RUN_SCHEMA_VERSION,
                "workbench_version": workbench_version(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "complete": False,
                **identity,
                **{f"model_{k}": v for k, v in self.info.to_dict().items()},
            }
        )
        f.create_group("measurements")
        f.flush()
        return f

    def measurement(
        self,
        key: str,
        texts: list[str],
        token_ids: list[np.ndarray],
        definitions: dict[str, str],
        item_index: list[int] | None = None,
    ) -> MeasurementWriter:
        """The group of one measurement; reopened (resumable) when its inputs are unchanged.

        ``item_index`` marks a part file of a data-parallel scan: the given items are those at
        these positions of the whole measurement (see :meth:`MeasurementWriter.merge`).
        """
        inputs_hash = _inputs_hash(texts, token_ids)
        name = f"measurements/{key}"
        if name in self._f and self._f[name].attrs.get("inputs_hash") != inputs_hash:
            del self._f[name]
        if name not in self._f:
            group = self._f.create_group(name)
            group.attrs.update({"inputs_hash": inputs_hash, "n_items": len(texts), "n_done": 0})
            group.create_dataset("texts", data=list(texts), dtype=UTF8)
            ids = group.create_dataset("token_ids", (len(token_ids),), dtype=_IDS)
            for i, t in enumerate(token_ids):
                ids[i] = np.asarray(t, dtype=np.int32)
            if item_index is not None:
                group.create_dataset("item_index", data=np.asarray(item_index, dtype=np.int64))
            self._f.flush()
        return MeasurementWriter(self._f, self._f[name], definitions)

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


class MeasurementWriter:
    """Per-item statistics of one measurement, written in order and checkpointed per batch."""

    def __init__(self, f: h5py.File, group: h5py.Group, definitions: dict[str, str]) -> None:
        self._f = f
        self._group = group
        self.definitions = definitions
        self.n_items = int(group.attrs["n_items"])

    @property
    def n_done(self) -> int:
        return int(self._group.attrs["n_done"])

    def write(self, start: int, items: list[dict[str, np.ndarray]]) -> None:
        """Store statistics of items ``start .. start+len(items)`` and mark them done.

        ``items[i][name]`` has the same shape for every item (e.g. ``[n_layers, n_heads]``).
        """
        if start != self.n_done:
            raise ValueError(f"items are written in order: next is {self.n_done}, not {start}")
        for name, definition in self.definitions.items():
            block = np.stack([item[name] for item in items]).astype(np.float32)  # [batch, ...]
            key = f"stats/{name}"
            if key not in self._group:
                d = self._group.create_dataset(
                    key, (self.n_items, *block.shape[1:]), dtype=np.float32, fillvalue=np.nan
                )
                d.attrs["definition"] = definition
            self._group[key][start : start + len(items)] = block
        # n_done moves only after the data is flushed: a kill in between costs one batch, never
        # a half-written one counted as done.
        self._f.flush()
        self._group.attrs["n_done"] = start + len(items)
        self._f.flush()

    def merge(self, parts: list[str | Path]) -> None:
        """Fill this measurement from the part files of a data-parallel scan; all items done.

        Each part is a run file (usually a rank's ``.partial``) of the same model whose group of
        this measurement holds some of the items, all done, and ``item_index`` (their positions
        here). Together the parts must cover every item exactly once, with the same inputs.
        """
        key = self._group.name.rsplit("/", 1)[-1]
        texts = [t.decode() for t in self._group["texts"][()]]
        token_ids = list(self._group["token_ids"][()])
        merged: dict[str, np.ndarray] = {}  # name -> [n_items, ...]
        covered = np.zeros(self.n_items, dtype=bool)
        for path in map(Path, parts):
            with open_h5(path, RUN_SCHEMA, RUN_SCHEMA_VERSION) as f:
                check_run_model(
                    model_info_from_attrs(f.attrs), model_info_from_attrs(self._f.attrs), path
                )
                group = f.get(f"measurements/{key}")
                if group is None or "item_index" not in group:
                    raise RunFileError(f"{path} holds no part of measurement {key!r}")
                done, n = int(group.attrs["n_done"]), int(group.attrs["n_items"])
                if done < n:
                    raise RunFileError(
                        f"{path} has {done}/{n} items of {key!r}; rerun the scan to finish it"
                    )
                index = group["item_index"][()]
                if len(index) and (index.min() < 0 or index.max() >= self.n_items):
                    raise RunMismatchError(f"{path}: items of {key!r} beyond {self.n_items}")
                if covered[index].any():
                    raise RunMismatchError(f"{path} repeats items of {key!r} of another part")
                inputs = _inputs_hash([texts[i] for i in index], [token_ids[i] for i in index])
                if group.attrs["inputs_hash"] != inputs:
                    raise RunMismatchError(f"{path} measured other inputs for {key!r}")
                covered[index] = True
                if not len(index):  # more ranks than items
                    continue
                for name in self.definitions:
                    part = group[f"stats/{name}"][()]  # [len(index), ...]
                    if name not in merged:
                        merged[name] = np.full((self.n_items, *part.shape[1:]), np.nan, np.float32)
                    merged[name][index] = part
        if not covered.all():
            raise RunFileError(
                f"the parts cover {int(covered.sum())}/{self.n_items} items of {key!r}"
            )
        for name, definition in self.definitions.items():
            if f"stats/{name}" in self._group:
                del self._group[f"stats/{name}"]
            d = self._group.create_dataset(f"stats/{name}", data=merged[name])
            d.attrs["definition"] = definition
        self._f.flush()
        self._group.attrs["n_done"] = self.n_items
        self._f.flush()

    def stats(self) -> dict[str, np.ndarray]:
        """All stored statistics ``{name: [n_done, ...]}``."""
        if "stats" not in self._group:
            return {}
        return {name: d[: self.n_done] for name, d in self._group["stats"].items()}


def _inputs_hash(texts: list[str], token_ids: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for text, ids in zip(texts, token_ids, strict=True):
        digest.update(text.encode())
        digest.update(np.asarray(ids, dtype=np.int32).tobytes())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def write_circuit(path: str | Path, name: str, circuit_json: str, info: ModelInfo) -> Path:
    """Store a circuit's JSON under ``/circuits/<name>`` of the run file at ``path``.

    An existing run file must belong to the same model (:func:`check_run_model`); it is copied,
    extended and renamed over the original, so a failure leaves it untouched. Without a file, a
    run file that holds only the circuit is created.
    """
    path = Path(path)
    if not path.exists():
        writer = RunWriter(path, info, {"circuit": name})
        writer._f.create_dataset(f"circuits/{name}", data=circuit_json, dtype=UTF8)
        return writer.finish()
    with Run(path) as run:
        check_run_model(run.model, info, path)  # the circuit's model
    with atomic_path(path) as copy:
        shutil.copyfile(path, copy)
        with h5py.File(copy, "r+") as f:
            key = f"circuits/{name}"
            if key in f:
                del f[key]
            f.create_dataset(key, data=circuit_json, dtype=UTF8)
    return path
