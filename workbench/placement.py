"""Model placement: one device, or a model too large for one GPU spread over several.

``workbench.load(spec, device_map="auto")`` hands the device map to ``from_pretrained``;
accelerate places consecutive decoder layers on the GPUs and moves the hidden states between them
(one GPU works at a time). The streamed capture path runs unchanged: each layer's attention
function gets q, k, v on that layer's GPU, the statistics kernels run there, and each layer's
statistics are copied to the CPU as it finishes. Triton launches a kernel on the *current* CUDA
device, not on its tensors' device, so :func:`follow_device_map` makes each placed module's GPU
current while the module runs. (Many prompts over many GPUs, one model copy each, is
:mod:`workbench.distributed`.)

A load goes through both steps here: :func:`resolve` checks the caller's choice before the
weights are read, :func:`place` puts the loaded module where it was asked to go.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from workbench.errors import DeviceError


def resolve(
    device: str | torch.device | None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
) -> tuple[torch.device | None, dict[str, Any]]:
    """The one device of a model (default CUDA when available, else CPU; ``None`` under a
    device map) and the placement keywords for ``from_pretrained`` (``device_map`` and
    ``max_memory``; empty for one device).

    Raises:
        ValueError: both ``device`` and ``device_map``, or ``max_memory`` without a device map.
        DeviceError: ``device`` is no device name, or this machine or torch build lacks it.
    """
    if device_map is not None and device is not None:
        raise ValueError("pass either device (one device) or device_map (several), not both")
    if max_memory is not None and device_map is None:
        raise ValueError("max_memory applies to a device_map; pass device_map too")
    if device_map is not None:
        return None, {"device_map": device_map, "max_memory": max_memory}
    return _available(device or ("cuda" if torch.cuda.is_available() else "cpu")), {}


def _available(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` when this process can place a model there."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"{device!r} is not a device name (cpu, cuda, cuda:1, mps...)") from e
    if resolved.type in ("cpu", "meta"):
        return resolved
    backend = getattr(torch, resolved.type, None)  # torch.cuda, torch.xpu, torch.mps, ...
    if backend is None or not backend.is_available():
        raise DeviceError(
            f"device {resolved} is not available: this machine or this torch build "
            f"({torch.__version__}) has no {resolved.type}; use cpu"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if resolved.index is not None and resolved.index >= count:
        raise DeviceError(f"device {resolved} does not exist: this machine has {count}")
    return resolved


def place(module: torch.nn.Module, device: torch.device | None) -> None:
    """Move a loaded ``module`` to ``device``; ``None``: it was loaded with a device map, and
    :func:`follow_device_map` makes its kernels launch on each placed module's GPU."""
    if device is None:
        follow_device_map(module)
    else:
        module.to(device)


def follow_device_map(model: torch.nn.Module) -> None:
    """Make each placed module's GPU the current CUDA device while it runs.

    ``model.hf_device_map`` (set by ``from_pretrained(device_map=...)``) names the module of each
    placement, e.g. ``{"model.layers.0": 0, ..., "model.layers.20": 1, "lm_head": 1}``. Kernels
    that launch on the current device (Triton's) then run where their tensors are. After each
    forward pass every GPU of the map is synchronised (the streamed recorder copies statistics
    to the CPU without blocking, and synchronises only the current device before reading them)
    and the caller's current device is restored. Nothing is hooked when fewer than two GPUs are
    used.
    """
    placement = {
        name: index
        for name, device in (getattr(model, "hf_device_map", None) or {}).items()
        if (index := _cuda_index(device)) is not None
    }
    devices = sorted(set(placement.values()))
    if len(devices) < 2:
        return
    callers: list[int] = []

    def finish(*_: object) -> None:
        for index in devices:
            torch.cuda.synchronize(index)
        torch.cuda.set_device(callers.pop())

    model.register_forward_pre_hook(lambda *_: callers.append(torch.cuda.current_device()))
    model.register_forward_hook(finish)
    for name, index in placement.items():
        module = model.get_submodule(name) if name else model
        module.register_forward_pre_hook(partial(_make_current, index))


def _make_current(index: int, *_: object) -> None:
    torch.cuda.set_device(index)


def _cuda_index(device: Any) -> int | None:
    """GPU index of a device-map value (``0``, ``"cuda:1"``, ``torch.device``), else None."""
    if isinstance(device, int):
        return device
    if isinstance(device, str) and not device.startswith("cuda"):
        return None  # "cpu", "disk", "meta"
    device = torch.device(device)
    return (device.index or 0) if device.type == "cuda" else None
