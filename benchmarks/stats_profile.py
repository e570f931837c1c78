"""Where the statistics kernel's time goes: its machine code and Nsight Compute's counters.

``python -m benchmarks.stats_profile --out DIR`` (CUDA GPU with ``cuobjdump`` and ``ncu``):

1. compiles the stats kernel (statistics only, and statistics + output) and the received-attention
   kernel at d=128 in bf16 with a fresh Triton cache under ``DIR``, disassembles each cubin with
   ``cuobjdump -sass`` and counts the instruction classes that matter here: ``HGMMA``
   (Hopper's warpgroup matrix instruction; ``HMMA`` alone would mean the older, slower path),
   ``MUFU.EX2`` / ``MUFU.TANH`` (the special-function unit: one per score for the softmax), and
   spills (``LDL``/``STL``);
2. runs one warm call of each under ``ncu --clock-control none`` and records the counters that
   say what bounds it: tensor-pipe, special-function (XU), FMA and ALU pipe utilisation, issue
   slot use and the top warp-stall reasons.

Results: ``DIR/stats-profile.json`` and the raw ``ncu`` reports. ``--once MODE --d D --length L``
is the single call that ``ncu`` profiles (also usable by hand).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from kernels import attention_stats, received_attention
from workbench.arguments import Parser, integer, output_dir
from workbench.atomic import atomic_write_text

KERNELS = {"stats": "_stats_fwd", "stats+out": "_stats_fwd", "received": "_received_fwd"}
MODES = tuple(KERNELS)
SHAPES = ((128, 16384),)  # (d, L), H=32 query heads, 8 KV heads
SASS_CLASSES = ("HGMMA", "HMMA", "MUFU.EX2", "MUFU.TANH", "MUFU.RCP", "FFMA", "FMUL", "FADD",
                "FMNMX", "FSETP", "FSEL", "SEL", "LDL", "STL", "LDGSTS", "UTMALDG",
                "BAR")  # fmt: skip
SASS_OP = r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9.]+)"  # the opcode after the address
NCU_METRICS = (
    "gpu__time_duration.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__occupancy_limit_registers",
    "smsp__average_warp_latency_issue_stalled_wait.ratio",
    "smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio",
    "smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio",
    "smsp__average_warp_latency_issue_stalled_barrier.ratio",
    "smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio",
    "smsp__average_warp_latency_issue_stalled_dispatch_stall.ratio",
    "smsp__average_warp_latency_issue_stalled_mio_throttle.ratio",
)


def once(mode: str, d: int, length: int) -> None:
    """One warm call of the kernel (the first call compiles and is not the one profiled)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kw = dict(sink_size=4, recent_window=256, spans=[[length // 3, length // 3 + 64]])
    for _ in range(2):
        st = attention_stats(q, k, v, return_output=mode == "stats+out", **kw)
        if mode == "received":
            received_attention(q, k, st.lse)
    torch.cuda.synchronize()


def sass_counts(cache: Path, kernel: str) -> dict[str, dict[str, int]]:
    """Instruction-class counts of every compiled ``kernel`` cubin under a Triton cache."""
    counts = {}
    for cubin in sorted(cache.rglob(f"{kernel}.cubin")):
        sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
        ops = collections.Counter(m.group(1) for m in re.finditer(SASS_OP, sass))
        meta = json.loads((cubin.parent / f"{kernel}.json").read_text())
        key = (
            f"{cubin.parent.name[:12]} warps={meta.get('num_warps')} "
            f"stages={meta.get('num_stages')}"
        )
        counts[key] = {c: sum(n for op, n in ops.items() if op.startswith(c)) for c in SASS_CLASSES}
        usage = subprocess.run(["cuobjdump", "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        for field in ("REG", "STACK", "SHARED", "LOCAL"):
            found = re.search(rf"{field}:(\d+)", usage)
            counts[key][field.lower()] = int(found.group(1)) if found else None
    return counts


def ncu(mode: str, d: int, length: int, out: Path) -> dict[str, float | str]:
    """Nsight Compute counters of the second (warm) launch of the mode's kernel (`KERNELS`): the
    sections' text report to a file, the metrics of `NCU_METRICS` parsed."""
    target = [sys.executable, "-m", "benchmarks.stats_profile", *_once_args(mode, d, length)]
    base = ["ncu", "--clock-control", "none", "--kernel-name", KERNELS[mode], "--launch-skip", "1",
            "--launch-count", "1"]  # fmt: skip
    stem = f"ncu-{mode.replace('+', '_')}-d{d}"
    sections = [a for s in ("SpeedOfLight", "ComputeWorkloadAnalysis", "WarpStateStats",
                            "LaunchStats", "Occupancy", "InstructionStats")
                for a in ("--section", s)]  # fmt: skip
    run = subprocess.run(base + sections + target, capture_output=True, text=True)
    (out / f"{stem}-sections.txt").write_text(run.stdout + run.stderr)
    cmd = [*base, "--metrics", ",".join(NCU_METRICS), "--csv", *target]
    run = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{stem}-metrics.csv").write_text(run.stdout + run.stderr)
    values: dict[str, float | str] = {}
    for line in run.stdout.splitlines():
        cells = [c.strip('"') for c in line.split('","')]
        if len(cells) > 3 and cells[-3] in NCU_METRICS:
            try:
                values[cells[-3]] = float(cells[-1].replace(",", ""))
            except ValueError:
                values[cells[-3]] = cells[-1]
    if not values:
        values["error"] = (run.stderr or run.stdout)[-500:]
    return values


def _once_args(mode: str, d: int, length: int) -> list[str]:
    return ["--once", mode, "--d", str(d), "--length", str(length)]


def build_parser() -> Parser:
    parser = Parser(prog="python -m benchmarks.stats_profile",
                    description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--out", type=output_dir, help="results and ncu reports (needed)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--once", choices=MODES, help="only one warm call of this mode")
    parser.add_argument("--d", type=integer(1, 256), default=SHAPES[0][0], help="with --once")
    parser.add_argument("--length", type=integer(1), default=SHAPES[0][1], help="with --once")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.once is None and args.out is None:
        parser.error("--out DIR is needed")
    if not torch.cuda.is_available():
        print("benchmarks.stats_profile needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.once:
        once(args.once, args.d, args.length)
        return 0
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__}
    for d, length in SHAPES:
        for mode in args.modes:
            cache = args.out / f"triton-cache-{mode.replace('+', '_')}-d{d}"
            env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
            subprocess.run([sys.executable, "-m", "benchmarks.stats_profile",
                            *_once_args(mode, d, length)], env=env, check=True)  # fmt: skip
            name = f"{mode} d={d} L={length}"
            result[name] = {
                "sass": sass_counts(cache, KERNELS[mode]),
                "ncu": ncu(mode, d, length, args.out),
            }
            print(name, json.dumps(result[name]), flush=True)
            atomic_write_text(args.out / "stats-profile.json", json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
