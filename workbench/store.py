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
    /intervals/<name>/low, high     [n_layers, n_heads] float32 bootstrap bounds of the score,
                                    attrs: method, confidence, resamples, seed
    /intervals/<name>/n_trials      [n_layers, n_heads] int32, items behind each score
    /labels/<label>                 [n_layers, n_heads] bool, attrs: rule
    /tentative/<label>              [n_layers, n_heads] bool: above the threshold, not labelled
    /circuits/<name>                UTF-8 JSON of a circuit (interventions.circuit.Circuit)
    /results/<name>                 UTF-8 JSON of an intervention result (the explorer's lab)

A *measurement* is one set of inputs (the scan's prompts, needle trials, a text domain...) and
the per-item statistics a probe computed on them. Writes are atomic: :class:`RunWriter` writes
``.<name>.partial`` beside the target and renames it over the target only when the scan is
complete, so a stopped scan never damages the previous file. Each measurement records how many
items are done (``n_done``), which is what a rerun resumes from. :func:`open_run` reads lazily:
opening a run checks its seal and its layout (no data is parsed); each table is read when asked
for.

Integrity: the first 512 bytes of every workbench HDF5 file are HDF5's *user block*, which the
library skips; the workbench keeps its *seal* there (:func:`seal`): the file's kind and schema
version and, once the file is complete, the SHA-256 and size of everything after the block. A
reader checks the seal before h5py parses a byte (:func:`open_h5`), so a truncated or altered file
is refused with :class:`~workbench.errors.CorruptFileError` and never reaches HDF5's parser (whose
C code can loop forever on damaged metadata). Numeric datasets that a scan writes carry HDF5's
fletcher32 checksum as well, which guards the partial file between checkpoints. Opening a run
then checks its layout against its model identity (:func:`check_layout`). One writer at a time:
:class:`RunWriter` and :func:`edit_run` hold ``workbench.atomic.writer_lock`` on the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from workbench.atomic import atomic_path, check_output, writer_lock
from workbench.errors import (
    CorruptFileError,
    ForeignFileError,
    MissingEntryError,
    RunFileError,
    RunMismatchError,
    SchemaVersionError,
    ShapeError,
)
from workbench.models import ModelInfo
from workbench.scores import Interval, ScoreTable

RUN_SCHEMA = "attention-head-workbench/run"
RUN_SCHEMA_VERSION = 2  # 2: sealed (the user block's checksum); 1 had no seal
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


SEAL_SIZE = 512  # bytes of the HDF5 user block that hold the seal
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HASH_BLOCK = 1 << 20


def create_h5(path: Path, schema: str, schema_version: int) -> h5py.File:
    """A new workbench HDF5 file at ``path``, open for writing: the user block reserved and its
    seal saying *unsealed* until :func:`seal` closes the deal, and the root attributes
    ``schema`` and ``schema_version`` set."""
    f = h5py.File(path, "w", userblock_size=SEAL_SIZE)
    f.attrs.update({"schema": schema, "schema_version": schema_version})
    f.flush()
    _write_seal(path, f"{schema} {schema_version}\nunsealed\n")
    return f


def seal(path: Path) -> None:
    """Seal a complete, closed workbench file: write the SHA-256 and size of its content (every
    byte after the user block) into its user block, keeping the kind and version already there.
    Any later change of the content breaks the seal (:func:`open_h5` refuses the file)."""
    kind = _read_seal(path)[0]
    digest, size = _content_digest(path)
    _write_seal(path, f"{kind}\nsha256 {digest} {size}\n")


def _seal_block(text: str) -> bytes:
    """The user block that holds ``text``: ASCII, then zero bytes up to :data:`SEAL_SIZE`."""
    data = text.encode("ascii", errors="replace")
    return data.ljust(SEAL_SIZE, b"\0")[:SEAL_SIZE]


def _write_seal(path: Path, text: str) -> None:
    with open(path, "r+b") as fh:
        fh.write(_seal_block(text))


def _read_seal(path: Path) -> list[str]:
    """The seal's lines (``["<schema> <version>", "unsealed" | "sha256 <hex> <size>"]``), or
    an error that says what the file is instead."""
    with open(path, "rb") as fh:
        block = fh.read(SEAL_SIZE)
        signature = fh.read(len(_HDF5_SIGNATURE))
    if not block.startswith(b"attention-head-workbench/"):
        if block.startswith(_HDF5_SIGNATURE):
            raise ForeignFileError(
                f"{path} is not a workbench file (an HDF5 file without the workbench seal: "
                "another program's, a truncated or corrupt one, or a workbench file of schema "
                "version 1, written before files were sealed: rerun the command that wrote it)"
            )
        raise ForeignFileError(f"{path} is not an HDF5 file written by the workbench")
    lines = block.partition(b"\0")[0].decode("ascii", errors="replace").split("\n")[:-1]
    # byte for byte the block the writer makes of these lines: any other byte is damage
    canonical = _seal_block("\n".join(lines) + "\n")
    if len(lines) != 2 or block != canonical or signature != _HDF5_SIGNATURE:
        raise CorruptFileError(
            f"{path} is corrupt: its seal (the first {SEAL_SIZE} bytes) is damaged"
        )
    return lines


def _content_digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of the bytes after the user block."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        fh.seek(SEAL_SIZE)
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def check_seal(path: Path, schema: str, schema_version: int, *, sealed: bool = True) -> None:
    """Check the seal of a workbench file without parsing it as HDF5: its kind and version, and
    either (``sealed``) that its content still has the recorded SHA-256 and size, or (a partial
    file that a rerun resumes) that it was never sealed.

    Raises:
        ForeignFileError: not a workbench file of kind ``schema``.
        SchemaVersionError: another schema version.
        CorruptFileError: the seal is damaged or the content does not match it.
        RunFileError: unfinished (``sealed``) or already sealed (not ``sealed``).
    """
    if not path.is_file():
        raise RunFileError(f"no such file: {path}")
    kind, state = _read_seal(path)
    found, _, version = kind.rpartition(" ")
    if found != schema:
        raise ForeignFileError(f"{path} is a workbench file of kind {found!r}, not {schema!r}")
    if version != str(schema_version):
        raise SchemaVersionError(
            f"{path} has schema version {version}; this workbench reads version "
            f"{schema_version} (rerun the command that wrote it with this version)"
        )
    if state == "unsealed":
        if sealed and schema == RUN_SCHEMA:
            raise RunFileError(f"{path} is an unfinished scan; rerun the scan to finish it")
        if sealed:
            raise RunFileError(f"{path} is unfinished; rerun the command that writes it")
        return
    if not sealed:
        raise RunFileError(f"{path} is complete, not a partial file")
    words = state.split(" ")
    if len(words) != 3 or words[0] != "sha256":
        raise CorruptFileError(f"{path} is corrupt: its seal is damaged ({state!r})")
    if (words[1], words[2]) != tuple(map(str, _content_digest(path))):
        raise CorruptFileError(
            f"{path} is truncated or corrupt: its content does not match the checksum it was "
            "sealed with; rerun the command that wrote it"
        )


def open_h5(
    path: Path, schema: str, schema_version: int, mode: str = "r", *, sealed: bool = True
) -> h5py.File:
    """Open a workbench HDF5 file after :func:`check_seal` (``sealed``: a complete file;
    otherwise a partial file to resume) and check what it is, with one clear error per
    failure."""
    check_seal(path, schema, schema_version, sealed=sealed)
    try:
        f = h5py.File(path, mode)
    except OSError as e:  # the seal holds, so the file was damaged before it was sealed
        raise CorruptFileError(f"{path} cannot be read as HDF5 ({e})") from e
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
            check_layout(self._f, self.model, self.path)
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
        """A score table with its interval (none in files written before intervals)."""
        d = self._get("scores", name)
        return ScoreTable.from_attrs(name, d[()], d.attrs, self._interval(name))

    def _interval(self, name: str) -> Interval | None:
        group = self._f.get(f"intervals/{name}")
        if group is None:
            return None
        a = group.attrs
        return Interval(
            group["low"][()],
            group["high"][()],
            group["n_trials"][()],
            confidence=float(a["confidence"]),
            resamples=int(a["resamples"]),
            seed=int(a["seed"]),
        )

    @property
    def label_names(self) -> list[str]:
        return sorted(self._f["labels"].keys()) if "labels" in self._f else []

    def label(self, name: str) -> np.ndarray:
        """``[n_layers, n_heads]`` bool."""
        return self._get("labels", name)[()].astype(bool)

    def tentative(self, name: str) -> np.ndarray:
        """``[n_layers, n_heads]`` bool: heads above label ``name``'s threshold whose interval
        reaches down to it (all False in files written before intervals)."""
        if f"tentative/{name}" not in self._f:
            return np.zeros_like(self.label(name))
        return self._f[f"tentative/{name}"][()].astype(bool)

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
    The writer holds the target's :func:`~workbench.atomic.writer_lock` until :meth:`finish` or
    :meth:`close`: a second writer of the same target is refused
    (:class:`~workbench.errors.OutputLockedError`), and so is a target that cannot be written
    (:class:`~workbench.errors.OutputError`), before any work.
    """

    def __init__(self, path: str | Path, info: ModelInfo, parameters: dict[str, Any]) -> None:
        self.path = check_output(Path(path))
        self.partial = partial_path(self.path)
        self.info = info
        self.path.parent.mkdir(parents=True, exist_ok=True)
        identity = {
            "model_config_hash": info.config_hash,
            "parameters": json.dumps(parameters, sort_keys=True),
        }
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(writer_lock(self.path))
        try:
            self._f = self._reopen(identity) if self.partial.exists() else None
            if self._f is None:
                self._f = self._create(identity)
        except BaseException:
            self._lock.close()
            raise

    def _reopen(self, identity: dict[str, str]) -> h5py.File | None:
        try:
            f = open_h5(self.partial, RUN_SCHEMA, RUN_SCHEMA_VERSION, mode="r+", sealed=False)
        except RunFileError:
            return None  # unreadable leftovers of a killed write: start again
        if any(str(f.attrs.get(k)) != v for k, v in identity.items()):
            f.close()
            return None
        return f

    def _create(self, identity: dict[str, str]) -> h5py.File:
        f = create_h5(self.partial, RUN_SCHEMA, RUN_SCHEMA_VERSION)
        f.attrs.update(
            {
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
                group.create_dataset(
                    "item_index", data=np.asarray(item_index, dtype=np.int64), fletcher32=True
                )
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
        d = self._f.create_dataset(key, data=table.values, fletcher32=True)
        d.attrs.update(table.attrs())
        interval = table.interval
        if f"intervals/{table.name}" in self._f:
            del self._f[f"intervals/{table.name}"]
        if interval is not None:
            group = self._f.create_group(f"intervals/{table.name}")
            for part in ("low", "high", "n_trials"):
                group.create_dataset(part, data=getattr(interval, part), fletcher32=True)
            group.attrs.update(interval.attrs())

    def write_label(
        self, name: str, mask: np.ndarray, rule: str, tentative: np.ndarray | None = None
    ) -> None:
        """Store label ``name`` (``mask [n_layers, n_heads]``) and the heads it leaves
        ``tentative``."""
        for group, data in (("labels", mask), ("tentative", tentative)):
            key = f"{group}/{name}"
            if key in self._f:
                del self._f[key]
            if data is not None:
                d = self._f.create_dataset(key, data=np.asarray(data, dtype=bool))
                d.attrs["rule"] = rule

    def finish(self) -> Path:
        """Mark complete, seal, and atomically replace the target file."""
        self._f.attrs["complete"] = True
        self._f.close()
        seal(self.partial)
        os.replace(self.partial, self.path)
        self._lock.close()
        return self.path

    def close(self) -> None:
        """Close without publishing (the partial file stays for a resume)."""
        if self._f.id.valid:
            self._f.close()
        self._lock.close()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


_FIELD_TYPES = {"str": str, "int": int, "bool": bool}  # ModelInfo's annotations, as strings


def model_info_from_attrs(attrs: Any) -> ModelInfo:
    """The model identity stored in a file's root attributes, each field of its declared type
    and the head counts consistent (``n_kv_heads`` divides ``n_heads``)."""
    fields = ModelInfo.__dataclass_fields__
    try:
        values = {k: _plain(attrs[f"model_{k}"]) for k in fields}
    except KeyError as e:
        raise RunFileError(f"run file lacks model identity attribute {e}") from e
    for name, f in fields.items():
        kind = f.type if isinstance(f.type, type) else _FIELD_TYPES[f.type]
        value = values[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise RunFileError(
                f"model identity attribute {name}={value!r} is not a {kind.__name__}"
            )
    counts = [values[k] for k in ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model")]
    if min(counts) < 1 or values["n_heads"] % values["n_kv_heads"]:
        raise RunFileError(
            f"model identity {values['n_layers']} layers x {values['n_heads']} heads, "
            f"{values['n_kv_heads']} KV heads is impossible"
        )
    return ModelInfo(**values)


# Where each group's datasets must be [n_layers, n_heads] (head-level tables).
_HEAD_TABLES = ("scores", "labels", "tentative")


def check_layout(f: h5py.File, info: ModelInfo, where: str | Path) -> None:
    """Raise :class:`~workbench.errors.CorruptFileError` unless the run file ``f`` has the layout
    of docs/run-format.md for the model ``info``: every head-level table (scores, labels,
    tentative labels, interval bounds) ``[n_layers, n_heads]``, score tables with their
    attributes, and every measurement's datasets ``[n_items, ...]`` with ``0 <= n_done <=
    n_items``. Reads metadata only (shapes and attributes), never data."""
    heads = (info.n_layers, info.n_heads)

    def fail(what: str) -> None:
        raise CorruptFileError(f"{where}: {what} (model {info.name}: {heads[0]} x {heads[1]})")

    def head_table(key: str, item: Any) -> None:
        if not isinstance(item, h5py.Dataset) or item.shape != heads:
            fail(f"{key} is {getattr(item, 'shape', 'a group')}, not [n_layers, n_heads]")

    for group in _HEAD_TABLES:
        for name, item in _members(f, group):
            head_table(f"{group}/{name}", item)
    for name, item in _members(f, "scores"):
        missing = {"definition", "threshold", "label", "parameters"} - set(item.attrs)
        if missing:
            fail(f"score {name!r} lacks attribute(s) {', '.join(sorted(missing))}")
    for name, item in _members(f, "intervals"):
        for part in ("low", "high", "n_trials"):
            head_table(f"intervals/{name}/{part}", item.get(part) if _is_group(item) else None)
    for key, group in _members(f, "measurements"):
        if not _is_group(group):
            fail(f"measurements/{key} is not a group")
        try:
            n_items, n_done = int(group.attrs["n_items"]), int(group.attrs["n_done"])
            str(group.attrs["inputs_hash"])
        except (KeyError, TypeError, ValueError) as e:
            fail(f"measurement {key!r} lacks a valid attribute ({e})")
        if not 0 <= n_done <= n_items:
            fail(f"measurement {key!r} has n_done {n_done} of n_items {n_items}")
        items = [(n, group.get(n)) for n in ("texts", "token_ids")]
        items += [(f"stats/{n}", d) for n, d in _members(group, "stats")]
        for name, item in items:
            if not isinstance(item, h5py.Dataset) or not item.shape or item.shape[0] != n_items:
                fail(f"measurements/{key}/{name} does not hold {n_items} items")


def _is_group(item: Any) -> bool:
    return isinstance(item, h5py.Group)


def _members(f: h5py.Group, group: str) -> list[tuple[str, Any]]:
    """``(name, item)`` of ``f[group]`` (none when absent; an error when it is no group)."""
    item = f.get(group)
    if item is None:
        return []
    if not _is_group(item):
        raise CorruptFileError(f"{f.file.filename}: {group} is not a group")
    return list(item.items())


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
                    key,
                    (self.n_items, *block.shape[1:]),
                    dtype=np.float32,
                    fillvalue=np.nan,
                    fletcher32=True,  # HDF5's per-chunk checksum: the partial file is unsealed
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
            with open_h5(path, RUN_SCHEMA, RUN_SCHEMA_VERSION, sealed=False) as f:
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
            d = self._group.create_dataset(f"stats/{name}", data=merged[name], fletcher32=True)
            d.attrs["definition"] = definition
        self._f.flush()
        self._group.attrs["n_done"] = self.n_items
        self._f.flush()

    def stats(self) -> dict[str, np.ndarray]:
        """All stored statistics ``{name: [n_done, ...]}``."""
        if "stats" not in self._group:
            return {}
        try:
            return {name: d[: self.n_done] for name, d in self._group["stats"].items()}
        except OSError as e:  # fletcher32 found a damaged chunk
            raise CorruptFileError(
                f"{self._f.filename} is corrupt ({e}); delete it and rerun the scan"
            ) from e


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
    with edit_run(path, info) as f:
        key = f"circuits/{name}"
        if key in f:
            del f[key]
        f.create_dataset(key, data=circuit_json, dtype=UTF8)
    return path


@contextlib.contextmanager
def edit_run(path: str | Path, info: ModelInfo | None = None) -> Iterator[h5py.File]:
    """Change a published run file: yields a copy of it open for writing (``h5py.File``, mode
    ``r+``), then seals the copy and renames it over the original. Every writer of a published
    run file goes through here, so the seal always covers what is stored.

    The file is opened (seal and layout checked) and, with ``info``, checked to belong to that
    model (:func:`check_run_model`) first; the target's writer lock is held throughout. A
    failure inside the block leaves the original untouched::

        with edit_run("runs/x.h5", model.info) as f:
            f.create_dataset("circuits/ioi", data=text, dtype=UTF8)
    """
    path = Path(path)
    with writer_lock(path):
        with Run(path) as run:
            if info is not None:
                check_run_model(run.model, info, path)
        with atomic_path(path) as copy:
            shutil.copyfile(path, copy)
            with h5py.File(copy, "r+") as f:
                yield f
            seal(copy)


def write_intervention_result(
    path: str | Path, name: str, result_json: str, info: ModelInfo
) -> Path:
    """Store one intervention result (the JSON of an evaluation or a per-head sweep, as the
    explorer's lab writes it) under ``/results/<name>`` of the run file at ``path``, replacing
    a result of that name. The run must belong to the model the result was measured on; the
    file is changed through :func:`edit_run` (atomic, sealed). ``result_json`` must be JSON
    text (which never holds a raw NUL, the one character an HDF5 string cannot)."""
    if name in ("", ".") or "/" in name or "\x00" in name:
        raise RunFileError(f"a result name is a name without '/' (an HDF5 name), not {name!r}")
    try:
        json.loads(result_json)
        result_json.encode()  # a lone surrogate passes json.loads but is not UTF-8
    except (TypeError, ValueError) as error:
        raise RunFileError(f"result {name!r} is not JSON text: {error}") from None
    with edit_run(path, info) as f:
        key = f"results/{name}"
        if key in f:
            del f[key]
        f.create_dataset(key, data=result_json, dtype=UTF8)
    return Path(path)


def intervention_results(path: str | Path) -> dict[str, str]:
    """``{name: JSON text}`` of every intervention result stored in the run file at ``path``
    (:func:`write_intervention_result`), in name order; empty when it holds none."""
    with Run(path) as run:
        group = run._f.get("results")
        if group is None:
            return {}
        return {name: group[name][()].decode() for name in sorted(group)}
