"""The interventions' ``workbench`` commands: ``intervene`` and ``ioi`` (handlers in
:mod:`interventions.command`, imported when the command runs).

Examples::

    workbench intervene smollm2-135m --spec spec.json --task ioi --task-option n=32
    workbench intervene smollm2-135m --sweep zero --task ioi --out sweep.json
    workbench intervene smollm2-135m --self-repair 9.0,10.3 --task ioi
    workbench intervene smollm2-135m --knockout-curve --scores runs/x.h5 --score retrieval \
        --task needle --task-option length=512 --plot knockout.html
    workbench ioi smollm2-135m --n 16 --run runs/smollm2.h5 --plot circuit.html
"""

from __future__ import annotations

import argparse

from workbench.arguments import (
    Command,
    device,
    integer,
    key_value,
    number_list,
    output_file,
)


def _intervene_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spec", help="intervention spec: JSON file or inline JSON (one or a list)")
    mode.add_argument("--sweep", metavar="KIND", help="apply KIND to each head alone (e.g. zero)")
    mode.add_argument("--self-repair", metavar="L.H,...", help="direct vs total effect per head")
    mode.add_argument(
        "--direct-effects", action="store_true", help="every head's direct effect (one pass)"
    )
    mode.add_argument(
        "--knockout-curve", action="store_true",
        help="top-k heads of --scores/--score knocked out together (k in --ks and all labelled "
        "heads) vs --controls draws of random unlabelled heads of equal size",
    )  # fmt: skip
    p.add_argument("--task", required=True, choices=["ioi", "needle", "loss", "toy"])
    p.add_argument(
        "--task-option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
        help="task option, repeatable (n=32, length=4096, depths=0.1,0.5, seed=1)",
    )  # fmt: skip
    p.add_argument(
        "--option", action="append", default=[], type=key_value, metavar="KEY=VALUE",
        help="spec option for --sweep/--self-repair (factor=2, beta=0.4, sinks=[0])",
    )  # fmt: skip
    p.add_argument(
        "--kind", default="zero", help="intervention kind for --self-repair and --knockout-curve"
    )
    p.add_argument(
        "--ks", type=number_list(int), metavar="K,...",
        help="top-k sizes of --knockout-curve (default 1,2,5,10,20; all labelled heads are added)",
    )  # fmt: skip
    p.add_argument("--plot", metavar="HTML", help="with --knockout-curve: write the figure")
    p.add_argument(
        "--heads", metavar="L.H,...",
        help="heads to sweep (default: all); with --spec, heads the random control never uses",
    )  # fmt: skip
    p.add_argument(
        "--scores", metavar="RUN",
        help="top-k heads of a run's score: swept, or (with --spec) kept out of the control",
    )  # fmt: skip
    p.add_argument("--score", help="score table name in --scores")
    p.add_argument("--top-k", type=integer(1), help="how many top heads (default 10)")
    p.add_argument(
        "--controls", type=integer(0), default=3, help="random-head control draws (0: none)"
    )
    p.add_argument(
        "--seed", type=integer(0, 2**32 - 1), default=0, help="seed of controls and bootstrap"
    )
    p.add_argument("--batch-size", type=integer(1), default=8, help="prompts per forward pass")
    p.add_argument("--path", choices=["auto", "pattern", "streamed"], default="auto")
    p.add_argument("--out", type=output_file, help="write the result as JSON")
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _ioi_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    p.add_argument(
        "--task", help="ioi, ioi-toy or colored-objects (default: ioi in the model's vocabulary)"
    )
    p.add_argument("--n", type=integer(1), default=16, help="prompts (default 16)")
    p.add_argument(
        "--seed",
        type=integer(0, 2**32 - 1),
        default=0,
        help="seed of the prompts (ABC twins: seed+1)",
    )
    p.add_argument(
        "--templates", type=number_list(int, 0), metavar="I,J",
        help="template indices to draw from (default all)",
    )  # fmt: skip
    p.add_argument("--exact-heads", type=integer(0), default=64,
                   help="heads that get exact activation patching (default 64)")  # fmt: skip
    p.add_argument("--max-senders", type=integer(1), default=30,
                   help="senders per path-patching step (default 30)")  # fmt: skip
    p.add_argument(
        "--rule", action="append", default=[], type=key_value, metavar="KEY=VALUE",
        help="override a class threshold (attend_io=0.3)",
    )  # fmt: skip
    p.add_argument("--no-checks", action="store_true", help="skip completeness and minimality")
    p.add_argument(
        "--out", type=output_file, help="circuit JSON (default runs/MODEL-TASK-circuit.json)"
    )
    p.add_argument(
        "--run", type=output_file, metavar="RUN.h5", help="also store the circuit in this run file"
    )
    p.add_argument(
        "--plot", type=output_file, metavar="HTML", help="write the circuit graph as HTML"
    )
    p.add_argument("--compare", metavar="CIRCUIT.json", help="report head overlap with a circuit")
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


COMMANDS = [
    Command(
        "intervene",
        "ablate, redistribute or patch heads and measure a task",
        "interventions.command:run_intervene",
        _intervene_arguments,
    ),
    Command(
        "ioi",
        "find an IOI-style circuit: head classes, edges, faithfulness",
        "interventions.command:run_ioi",
        _ioi_arguments,
    ),
]
