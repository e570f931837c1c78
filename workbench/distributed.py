"""Past one GPU: data-parallel scans over torch.distributed ranks.

**Data parallel** (many prompts). ``torchrun --nproc-per-node N -m workbench scan MODEL ...``
starts N copies of the command; torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) lets each join one process group
(:func:`init_from_env`). Every rank loads the whole model on its own GPU (``cuda:LOCAL_RANK``)
and, for every measurement the probes declare, measures the items ``i`` with
``i % N == rank``: interleaved, as PyTorch's ``DistributedSampler`` splits a dataset without
shuffling, so that a prompt set sorted by length still loads the ranks evenly. A rank checkpoints
its items in its own *part file*, the partial run file of ``<out>.rank<r>-of-<N>``
(:class:`workbench.store.RunWriter`, the run-file schema plus each group's ``item_index``). When
every rank is done, rank 0 merges the parts (:meth:`workbench.store.MeasurementWriter.merge`)
into the run file, scores and publishes it with the single-process scan's own step
(:func:`workbench.probe.publish`) and deletes the parts: the result is the file a single-process
scan writes. A rank that dies leaves the parts behind (its own up to its last stored batch, the
others' as far as they got); rerunning the same command with the same N resumes every rank after
its last stored batch.

Only coordination crosses processes: each rank's outcome after measuring, and the score tables
from rank 0. The process group therefore uses gloo (TCP), which needs no GPU and spans nodes; the
part files meet on the filesystem, so the run file must be on storage every rank can read.

A model too large for one GPU is spread over several by :func:`workbench.load`'s ``device_map``
instead (:mod:`workbench.placement`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from workbench.errors import DistributedError
from workbench.models import Model, ModelInfo
from workbench.probe import Measurement, Probe, Stats, measure, publish, record, score
from workbench.scores import ScoreTable
from workbench.store import MeasurementWriter, RunWriter, partial_path

# Ranks wait for the slowest one before the merge; interleaved items keep that wait short, but a
# barrier must outlast one rank's longest batch of very long prompts.
DEFAULT_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a data-parallel job (``world_size`` 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def items(self, n_items: int) -> list[int]:
        """This rank's share of ``n_items`` items: ``rank, rank + world_size, ...``."""
        return list(range(self.rank, n_items, self.world_size))


def current() -> Ranks:
    """The ranks of the initialised default process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    return Ranks()


def init_from_env(timeout: timedelta = DEFAULT_TIMEOUT) -> Ranks:
    """Join the process group that torchrun's environment describes (gloo backend).

    A process started without torchrun (no ``WORLD_SIZE`` above 1) stays single; a group that
    is already initialised (a notebook or a launcher of the user's) is used as it is.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise DistributedError("this torch build has no torch.distributed")
        dist.init_process_group("gloo", timeout=timeout)
    return current()


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(ranks: Ranks, device: str | None) -> str | None:
    """The device of this rank's model copy: ``cuda:LOCAL_RANK`` for ``None`` or ``"cuda"`` when
    GPUs are visible, else ``device`` as given (``None``: :func:`workbench.load`'s default)."""
    if ranks.world_size == 1 or device not in (None, "cuda") or not torch.cuda.is_available():
        return device
    visible = torch.cuda.device_count()
    if ranks.local_rank >= visible:
        raise DistributedError(
            f"local rank {ranks.local_rank} needs GPU {ranks.local_rank} but this node shows "
            f"{visible}; start at most {visible} processes per node (--nproc-per-node)"
        )
    torch.cuda.set_device(ranks.local_rank)
    return f"cuda:{ranks.local_rank}"


def part_file(out: Path, rank: int, world_size: int) -> Path:
    """The run file whose partial copy holds rank ``rank``'s items (never published itself)."""
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}")


def scan_shards(
    measurements: dict[str, Measurement],
    probes: list[Probe],
    ranks: Ranks,
    *,
    out: str | Path | None,
    info: ModelInfo,
    parameters: dict[str, Any],
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, ScoreTable], Path | None]:
    """This rank's part of a scan of ``probes`` (see the module docstring); every rank returns
    all tables. With ``out=None`` nothing touches the disk: the ranks exchange their statistics
    instead."""
    progress = progress and ranks.is_main  # one bar (rank 0's share), not N interleaved ones
    if out is None:
        return _scan_in_memory(measurements, probes, ranks, batch_size, progress), None
    out = Path(out)
    part_parameters = {**parameters, "part": [ranks.rank, ranks.world_size]}
    failure: Exception | None = None
    part: RunWriter | None = None
    try:
        part = RunWriter(part_file(out, ranks.rank, ranks.world_size), info, part_parameters)
        for key, m in measurements.items():
            share = (ranks.rank, ranks.items(len(m.texts)), out)
            record(part, key, m, batch_size=batch_size, progress=progress, share=share)
    except Exception as e:  # the other ranks must hear of it, or they wait at the merge
        failure = e
    finally:
        if part is not None:
            part.close()
    _agree(ranks, failure)

    outcome: list[Any] = [None, None, None]  # tables, published path, error message
    if ranks.is_main:
        try:
            outcome[:2] = _merge(measurements, probes, ranks, out, info, parameters)
        except Exception as e:
            outcome[2] = f"{type(e).__name__}: {e}"
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    tables, written, error = outcome
    if error is not None:
        raise DistributedError(f"rank 0 could not merge the parts ({error})")
    return tables, written


def tokenize_split(
    model: Model, texts: list[str], max_tokens: int | None, ranks: Ranks
) -> dict[tuple[str, int | None], torch.Tensor]:
    """The prompts' token ids for :meth:`workbench.models.Model.tokenized`, each rank tokenizing
    its share and all ranks exchanging them (probes tokenize every prompt to build their
    measurements; on each rank that would be work that does not shrink with more ranks).
    Nothing is done for a single process."""
    if ranks.world_size == 1:
        return {}
    own = {i: model.tokenize(texts[i], max_tokens).numpy() for i in ranks.items(len(texts))}
    shares: list[dict[int, np.ndarray]] = [{} for _ in range(ranks.world_size)]
    dist.all_gather_object(shares, own)
    return {
        (texts[i], max_tokens): torch.from_numpy(ids)
        for share in shares
        for i, ids in share.items()
    }


def _agree(ranks: Ranks, failure: Exception | None) -> None:
    """Every rank learns whether any rank failed; the failed one raises its own error, the others
    a :class:`DistributedError` naming it."""
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    outcomes: list[str | None] = [None] * ranks.world_size
    dist.all_gather_object(outcomes, message)
    if failure is not None:
        raise failure
    failed = [f"rank {r} failed ({m})" for r, m in enumerate(outcomes) if m is not None]
    if failed:
        raise DistributedError("; ".join(failed) + "; rerun the same command to resume")


def _merge(
    measurements: dict[str, Measurement],
    probes: list[Probe],
    ranks: Ranks,
    out: Path,
    info: ModelInfo,
    parameters: dict[str, Any],
) -> tuple[dict[str, ScoreTable], Path]:
    """Rank 0: merge every rank's part into ``out``, score, publish, delete the parts."""
    parts = [partial_path(part_file(out, r, ranks.world_size)) for r in range(ranks.world_size)]
    writer = RunWriter(out, info, parameters)
    try:
        groups: dict[str, MeasurementWriter] = {}
        for key, m in measurements.items():
            groups[key] = writer.measurement(key, m.texts, m.token_ids, m.definitions)
            groups[key].merge(parts)
        tables, written = publish(writer, groups, probes)
    finally:
        writer.close()
    for path in parts:  # only once the merged file is published: until then they are the resume
        path.unlink(missing_ok=True)
    return tables, written


def _scan_in_memory(
    measurements: dict[str, Measurement],
    probes: list[Probe],
    ranks: Ranks,
    batch_size: int,
    progress: bool,
) -> dict[str, ScoreTable]:
    """Measure this rank's items, exchange the statistics, score on every rank."""
    own: dict[str, Stats] = {}
    failure: Exception | None = None
    try:
        for key, m in measurements.items():
            items = ranks.items(len(m.texts))
            own[key] = measure(m, batch_size=batch_size, progress=progress, items=items)
    except Exception as e:
        failure = e
    _agree(ranks, failure)
    shares: list[dict[str, Stats]] = [{} for _ in range(ranks.world_size)]
    dist.all_gather_object(shares, own)
    stats: dict[str, Stats] = {}
    for key, m in measurements.items():
        n_items = len(m.texts)
        stats[key] = {}
        for rank, share in enumerate(shares):
            for name, values in share[key].items():  # values: [items of this rank, ...]
                if name not in stats[key]:
                    stats[key][name] = np.empty((n_items, *values.shape[1:]), values.dtype)
                stats[key][name][rank :: ranks.world_size] = values
    return score(probes, stats)
