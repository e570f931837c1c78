"""Where the time of a streamed scan and of a recorded decoding step goes: torch.profiler.

``python -m benchmarks.e2e_profile --out DIR`` (CUDA GPU) builds the same Llama-2-7B-shaped model
as `benchmarks.e2e_streamed`, prefills ``--length`` tokens into a KV cache, and profiles four
phases with CPU and CUDA activities, each after one unprofiled warm-up:

- ``scan plain`` / ``scan recorded``: one forward of the prompt, plainly and under
  `workbench.capture.StreamedRecorder` with the fused kernel's output (``output="kernel"``);
- ``decode plain`` / ``decode recorded``: ``--decode-tokens`` greedy tokens, plainly and with
  per-token statistics of every layer kept on the GPU (the e2e benchmark's fastest recorded row).

Per phase it reports the wall time (without the profiler), the GPU's busy time (the union of
kernel intervals in the trace: where it is well under the wall time, the host is the bottleneck),
the device time per kernel group (SDPA, our statistics kernels, GEMMs, the rest), kernel launches
per step, and the host functions that take the time: a second run of the same phase under
cProfile (which slows Python down, so only its shares are read), per function inclusive of
callees. Results: ``DIR/e2e-profile.json`` and, per phase, the operator table, the cProfile
report and a Chrome trace (open in https://ui.perfetto.dev). Every file is written atomically.

``--tiny --device cpu`` is the dry run on a tiny random Llama (CPU activities only).
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from benchmarks.e2e_streamed import MIN_LENGTH, SDPA_BACKENDS, generate, gpu_missing, setup
from workbench.arguments import Parser, device, integer, output_dir
from workbench.atomic import atomic_path, atomic_write_text
from workbench.capture import StreamedRecorder

# kernel name -> group, first match wins (cuDNN's and flash's SDPA kernels, our Triton kernels)
KERNEL_GROUPS = (
    ("statistics kernels", r"^_stats_fwd|^_combine_splits|^_received_fwd"),
    ("SDPA", r"fmha|flash|cudnn|attention"),
    ("GEMM", r"gemm|xmma|cutlass|nvjet|sm90_"),
)
OUR_CODE = ("kernels/", "workbench/", "triton/runtime", "triton/backends", "transformers/")
TOP_FUNCTIONS = 40
SHORTEN = r"^.*?/(?=(?:kernels|workbench|triton|transformers)/)"  # the path up to the package


def kernel_group(name: str) -> str:
    """The group of a CUDA kernel by its name (`KERNEL_GROUPS`), else ``"other"``."""
    for group, pattern in KERNEL_GROUPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return group
    return "other"


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Milliseconds covered by the union of ``(start_us, end_us)`` intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e3


def device_summary(prof: profile, steps: int) -> dict[str, Any]:
    """Per step: the GPU's busy time, the device time per kernel group and the number of
    kernel launches, from the trace's CUDA kernel events."""
    kernels = [
        e
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0
    ]
    groups: dict[str, float] = defaultdict(float)
    names: dict[str, float] = defaultdict(float)
    for e in kernels:
        groups[kernel_group(e.name)] += e.time_range.elapsed_us() / 1e3 / steps
        names[e.name] += e.time_range.elapsed_us() / 1e3 / steps
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {
        "gpu_busy_ms": busy_ms(intervals) / steps,
        "kernel_ms_by_group": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": {name[:120]: ms for name, ms in top},
        "kernel_launches": len(kernels) / steps,
    }


def host_functions(stats: pstats.Stats, steps: int) -> dict[str, float]:
    """Milliseconds per step of each Python function of interest (`OUR_CODE`), inclusive of what
    it calls (cProfile's cumulative time), the `TOP_FUNCTIONS` largest."""
    totals = {
        f"{path}({line}): {name}": cumulative * 1e3 / steps
        for (path, line, name), (_, _, _, cumulative, _) in stats.stats.items()
        if any(part in path for part in OUR_CODE)
    }
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:TOP_FUNCTIONS]
    return {re.sub(SHORTEN, "", name): round(ms, 4) for name, ms in top}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], Any], steps: int, repeats: int = 3) -> float:
    """The best of ``repeats`` wall-clock runs, per step (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, (time.perf_counter() - start) * 1e3 / steps)
    return best


def profile_phase(name: str, fn: Callable[[], Any], steps: int, out: Path) -> dict[str, Any]:
    """Warm-up, wall time, one torch.profiler run for device times and CPU operators, one
    cProfile run for the host's Python functions."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    fn()
    result: dict[str, Any] = {"steps": steps, "wall_ms": wall_ms(fn, steps)}
    _sync()
    with profile(activities=activities) as prof:
        fn()
        _sync()
    result.update(device_summary(prof, steps))
    stem = re.sub(r"[^a-z0-9]+", "-", name)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    atomic_write_text(out / f"{stem}-operators.txt", table)
    with atomic_path(out / f"{stem}-trace.json") as tmp:
        prof.export_chrome_trace(str(tmp))
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    _sync()
    result["host_ms_by_function_under_cprofile"] = host_functions(pstats.Stats(profiler), steps)
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("cumulative").print_stats(60)
    atomic_write_text(out / f"{stem}-cprofile.txt", report.getvalue())
    print(name, json.dumps(result), flush=True)
    return result


def build_parser() -> Parser:
    parser = Parser(prog="python -m benchmarks.e2e_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=output_dir, required=True, help="results and traces")
    parser.add_argument(
        "--length", type=integer(MIN_LENGTH), default=None, help="default 32768, 128 with --tiny"
    )
    parser.add_argument("--layers", type=integer(1), default=None, help="default 32")
    parser.add_argument("--decode-tokens", type=integer(1), default=8)
    parser.add_argument("--sdpa", choices=sorted(SDPA_BACKENDS), default="cudnn")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (dry run)")
    parser.add_argument("--device", type=device, default="cuda", help="'cpu' for a dry run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if gpu_missing(args.device):
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.decode_tokens
    model, ids, kw = setup(args.tiny, args.length, args.layers, n, args.device)
    length, layers = ids.shape[1], model.config.num_hidden_layers
    here = torch.device(args.device)
    on_gpu = here.type == "cuda"

    def under_sdpa(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            if not on_gpu:
                return fn()
            with torch.nn.attention.sdpa_kernel(SDPA_BACKENDS[args.sdpa]):
                return fn()

        return run

    def recorded(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with StreamedRecorder(model, **kw, output="kernel", device=here):
                return fn()

        return run

    result: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(here) if on_gpu else "cpu",
        "torch": torch.__version__,
        "command": "python -m benchmarks.e2e_profile " + " ".join(argv or sys.argv[1:]),
        "length": length,
        "layers": layers,
        "sdpa": args.sdpa if on_gpu else "default",
        "phases": {},
    }
    phases = result["phases"]
    with torch.no_grad():
        scan = under_sdpa(lambda: model(ids, logits_to_keep=1).logits)
        phases["scan plain"] = profile_phase("scan plain", scan, 1, out)
        phases["scan recorded"] = profile_phase("scan recorded", recorded(scan), 1, out)
        cache = DynamicCache()
        prefill = under_sdpa(lambda: model(ids, past_key_values=cache, logits_to_keep=1))()
        first = prefill.logits[:, -1:].argmax(-1)
        del prefill
        decode = under_sdpa(lambda: generate(model, first, cache, n))
        phases["decode plain"] = profile_phase("decode plain", decode, n, out)
        phases["decode recorded"] = profile_phase("decode recorded", recorded(decode), n, out)
    atomic_write_text(out / "e2e-profile.json", json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
