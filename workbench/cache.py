"""Activation cache on disk: hook activations streamed prompt by prompt into HDF5.

``write_cache`` runs the model through its TransformerLens bridge one prompt at a time, keeps the
activations of the hooks whose names match a glob pattern (``blocks.*.attn.hook_z``), and writes
each as a chunked, gzip-compressed dataset ``acts/<hook>/<prompt index>``, so memory stays at one
prompt's activations however many prompts there are. HDF5 has no bfloat16: such tensors are stored
as float32 (float16 would lose bf16's range). The file appears atomically when complete.

``open_cache`` reads it back lazily::

    cache = open_cache("cache.h5")
    cache.hooks                                   # ['blocks.0.attn.hook_z', ...]
    cache["blocks.0.attn.hook_z", 3]              # tensor [pos, head, d_head] of prompt 3
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.atomic import atomic_path
from workbench.errors import MissingEntryError, WorkbenchError
from workbench.models import Model, ModelInfo
from workbench.store import (
    UTF8,
    create_h5,
    model_info_from_attrs,
    open_h5,
    seal,
    workbench_version,
)
from workbench.tasks import PromptSet

CACHE_SCHEMA = "attention-head-workbench/cache"
CACHE_SCHEMA_VERSION = 2  # 2: sealed like run files (workbench.store.seal)


def matching_hooks(model: Model, pattern: str) -> list[str]:
    """Hook names of the model's bridge that match a glob (comma-separated globs allowed)."""
    names = list(model.bridge().hook_dict)
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    matched = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not matched:
        examples = ", ".join(n for n in names if n.startswith("blocks.0."))
        raise WorkbenchError(f"no hook matches {pattern!r} (hooks of layer 0: {examples})")
    return matched


@torch.no_grad()
def write_cache(
    model: Model,
    prompts: PromptSet,
    hooks: str,
    out: str | Path,
    *,
    max_tokens: int | None = None,
    progress: bool = True,
) -> Path:
    """Cache the activations of ``hooks`` (glob) for every prompt into ``out``; returns its path."""
    out = Path(out)
    names = matching_hooks(model, hooks)
    with atomic_path(out) as partial:
        with create_h5(partial, CACHE_SCHEMA, CACHE_SCHEMA_VERSION) as f:
            _fill(f, model, prompts, names, max_tokens, progress)
        seal(partial)
    return out


def _fill(
    f: h5py.File,
    model: Model,
    prompts: PromptSet,
    names: list[str],
    max_tokens: int | None,
    progress: bool,
) -> None:
    """Write the prompts' activations of hooks ``names`` into the new cache file ``f``."""
    bridge = model.bridge()
    f.attrs.update(
        {
            "workbench_version": workbench_version(),
            "hooks": names,
            "complete": False,
            **{f"model_{k}": v for k, v in model.info.to_dict().items()},
        }
    )
    f.create_dataset("prompts/texts", data=list(prompts.texts), dtype=UTF8)
    for index, text in enumerate(
        tqdm(
            prompts.texts,
            desc="cache",
            unit="prompt",
            disable=not progress,
            file=sys.stderr,
        )
    ):
        ids = model.tokenize(text, max_tokens)
        _, acts = bridge.run_with_cache(ids[None].to(model.device), names_filter=names)
        for name in names:
            array = _storable(acts[name][0])  # batch dimension dropped
            f.create_dataset(
                f"acts/{name}/{index}",
                data=array,
                compression="gzip",
                compression_opts=4,
                chunks=True,
                fletcher32=True,
            )
        del acts
    f.attrs["complete"] = True


def _storable(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


class ActivationCache:
    """A cache file opened for lazy reading; index with ``cache[hook, prompt_index]``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open_h5(self.path, CACHE_SCHEMA, CACHE_SCHEMA_VERSION)
        self.model: ModelInfo = model_info_from_attrs(self._f.attrs)
        self.hooks: list[str] = [str(h) for h in self._f.attrs["hooks"]]

    @property
    def n_prompts(self) -> int:
        return int(self._f["prompts/texts"].shape[0])

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        hook, index = key
        if hook not in self.hooks:
            raise MissingEntryError(f"hook {hook!r} is not in {self.path} (has {self.hooks})")
        if not 0 <= index < self.n_prompts:
            raise IndexError(f"prompt index {index} out of range 0..{self.n_prompts - 1}")
        return torch.from_numpy(self._f[f"acts/{hook}/{index}"][()])

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()


def open_cache(path: str | Path) -> ActivationCache:
    """Open an activation cache written by :func:`write_cache` (lazy)."""
    return ActivationCache(path)
