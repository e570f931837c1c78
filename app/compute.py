"""Model work for the explorer: one loaded copy of each model per server process.

:class:`ModelPool` loads the model a run was made with (from the run's model identity) the first
time a page needs it and keeps it; every later request and background job of the same server
process reuses it. Forward passes that install hooks or swap the attention function take the
model's lock, so two browser tabs never interleave their hooks on one model.

Head views:

* :func:`workbench.figures.head_pattern` -- one head's attention pattern on a short prompt, from
  TransformerLens's ``blocks.{l}.attn.hook_pattern`` on the model's bridge.
* :func:`head_positions` -- the same head's statistics along positions at any length, from the
  streamed path (:class:`workbench.capture.StreamedRecorder`): no L×L matrix is formed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

import workbench
from workbench.capture import StreamedRecorder
from workbench.errors import ModelLoadError
from workbench.models import Model, ModelInfo
from workbench.store import check_run_model

# Above this many tokens a pattern heatmap has unreadable labels; the page shows positions only.
PATTERN_MAX_TOKENS = 64


def model_spec(info: ModelInfo) -> str:
    """The :func:`workbench.load` spec that reloads the model a run was made with."""
    if info.source in ("builtin", "toy", "hub"):
        return info.name
    if info.source == "local":
        return info.revision  # the resolved directory (see workbench.models._load_path)
    raise ModelLoadError(
        f"the run's model {info.name!r} came from a {info.source} file whose path the run does "
        "not record; scan from a Hugging Face directory or a built-in model to use model views"
    )


class ModelPool:
    """Models loaded once per server process, keyed by their run identity."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self._models: dict[tuple[str, str], Model] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self.loads = 0  # how many times a model was actually loaded (the UI shows it)

    def get(self, info: ModelInfo) -> Model:
        """The model of a run; loads it on first use. Raises a WorkbenchError if it cannot be
        loaded or is not the model the run was made with
        (:func:`workbench.store.check_run_model`)."""
        key = (model_spec(info), info.config_hash)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per model even when two requests ask at once
            if key not in self._models:
                model = workbench.load(key[0], device=self.device)
                check_run_model(info, model.info, f"the run (its model reloaded from {key[0]!r})")
                self._models[key] = model
                self.loads += 1
            return self._models[key]

    def lock(self, info: ModelInfo) -> threading.Lock:
        """Held around forward passes that hook or patch the model."""
        key = (model_spec(info), info.config_hash)
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def loaded(self) -> list[str]:
        return sorted(model.info.name for model in self._models.values())


_POOL = ModelPool()


def configure(device: str | None) -> None:
    """Set the device models of this server process load on (before any is loaded)."""
    global _POOL
    _POOL = ModelPool(device)


def pool() -> ModelPool:
    return _POOL


@dataclass
class PositionStats:
    """One head's statistics along the positions of one prompt (any length)."""

    first_token_mass: np.ndarray  # [q_pos]: A[i, 0]
    entropy: np.ndarray  # [q_pos]: -sum_j A[i, j] log A[i, j] (nats)
    max_prob: np.ndarray  # [q_pos]
    argmax: np.ndarray  # [q_pos]: the key each query attends to most
    received: np.ndarray  # [k_pos]: sum_i A[i, k] (column sums)
    received_rate: np.ndarray  # [k_pos]: received / number of queries that see key k

    def top_keys(self, k: int = 10) -> list[tuple[int, float, float]]:
        """(position, received rate, column sum) of the ``k`` keys with the highest rate."""
        order = np.argsort(-self.received_rate, kind="stable")[:k]
        return [(int(p), float(self.received_rate[p]), float(self.received[p])) for p in order]


def _blocks(model: Model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, the ModuleList of the model's n_layers transformer blocks)."""
    for name, module in model.hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.info.n_layers:
            parent, _, attribute = name.rpartition(".")
            return (model.hf.get_submodule(parent) if parent else model.hf), attribute, module
    raise ModelLoadError(f"cannot find the {model.info.n_layers} blocks of {model.info.name}")


@contextlib.contextmanager
def first_blocks(
    model: Model, n: int, on_block: Callable[[int, int], None] | None = None
) -> Iterator[None]:
    """Run only the first ``n`` transformer blocks (layer n-1's attention needs nothing after
    it); ``on_block(i, n)`` is called before block i (progress, and where a job is cancelled).
    Hold the model's lock: the block list is swapped for the duration."""
    parent, attribute, blocks = _blocks(model)
    kept = torch.nn.ModuleList(list(blocks)[:n])
    hooks = []
    if on_block is not None:
        for i, block in enumerate(kept):
            hooks.append(block.register_forward_pre_hook(lambda *_, i=i: on_block(i, n)))
    setattr(parent, attribute, kept)
    try:
        yield
    finally:
        setattr(parent, attribute, blocks)
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def head_positions(
    model: Model,
    token_ids: torch.Tensor,
    layer: int,
    head: int,
    on_block: Callable[[int, int], None] | None = None,
) -> PositionStats:
    """Streamed per-position statistics of one head (``token_ids: [seq]``), no L×L tensor.

    Only blocks 0..layer run; ``on_block`` reports each (see :func:`first_blocks`)."""
    with (
        first_blocks(model, layer + 1, on_block),
        StreamedRecorder(model.hf, sink_size=1, received=True) as recorder,
    ):
        model.hf(token_ids[None].to(model.device), use_cache=False)
    stats = recorder.stats[layer]  # fields [batch, n_heads, q_pos]
    received = recorder.received[layer][0, head].float().numpy()  # [k_pos]
    n = received.shape[0]
    # queries that see key k: n - k when causal (queries k..n-1), all n when bidirectional
    seen_by = np.arange(n, 0, -1) if model.info.causal else np.full(n, n)
    return PositionStats(
        first_token_mass=stats.sink_mass[0, head].float().numpy(),
        entropy=stats.entropy[0, head].float().numpy(),
        max_prob=stats.max_prob[0, head].float().numpy(),
        argmax=stats.argmax[0, head].numpy(),
        received=received,
        received_rate=received / seen_by,
    )
