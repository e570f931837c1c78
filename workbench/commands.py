"""Handlers of the ``workbench`` commands of the core and the scanner (``workbench/cli.py`` holds
their arguments; the interventions and the explorer register their own commands in
``interventions/cli.py`` and ``app/cli.py``).

Each handler takes the parsed namespace, prints results on stdout and progress on stderr, and
raises a `WorkbenchError` for anything the user can fix (the CLI prints it as one line and exits
with code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench import distributed
from workbench.atomic import atomic_write_text, check_output
from workbench.cache import write_cache
from workbench.errors import DistributedError, WorkbenchError
from workbench.export import export, select_full
from workbench.headmap import HeadMap, Policy
from workbench.kv_policy import evaluate_map, machine
from workbench.models import load
from workbench.scanner import ScanResult, figure_path, scan
from workbench.store import check_run_model, open_run
from workbench.tasks import load_prompts
from workbench.tasks.needle import NEEDLES, needle_grid, toy_recall_grid
from workbench.toys import train_toy


def run_scan(args: argparse.Namespace) -> None:
    """``workbench scan``."""
    out = Path(args.out) if args.out else check_output(Path("runs") / f"{Path(args.model).stem}.h5")
    figure = check_output(figure_path(out))
    # under torchrun each rank scans its share of the prompts on its own GPU (workbench.distributed)
    ranks = distributed.init_from_env()
    try:
        if ranks.world_size > 1 and args.device_map:
            raise DistributedError(
                "--device-map spreads one model copy over this process's GPUs; under torchrun "
                "each rank holds its own copy on one GPU: use one or the other"
            )
        placement = {"device_map": args.device_map} if args.device_map else {}
        device = None if args.device_map else distributed.rank_device(ranks, args.device)
        dtype = getattr(torch, args.dtype)
        model = load(args.model, device=device, dtype=dtype, **placement)
        result = scan(
            model,
            args.prompts,
            probes=",".join(args.probes),
            out=out,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            path=args.path,
            options=dict(args.option),
            progress=not args.quiet,
        )
    finally:
        distributed.shutdown()
    if ranks.is_main:
        print(result.summary())
        print()
        print(f"run file: {result.path} (the grids: workbench show {result.path})")
        print(f"figure: {result.write_html(figure)}")


def run_show(args: argparse.Namespace) -> None:
    """``workbench show``."""
    with open_run(args.run) as run:
        names = args.scores or run.score_names
        tables = {name: run.score(name) for name in names}
        info = run.model
        inputs = ", ".join(f"{m} ({run.n_items(m)} items)" for m in run.measurement_names)
        print(
            f"{run.path}: {info.name} ({info.revision}), created {run.attrs['created']}; "
            f"measurements: {inputs}"
        )
    result = ScanResult(info, tables, Path(args.run))
    print(result.summary() if args.summary else result.grids())


def run_export(args: argparse.Namespace) -> None:
    """``workbench export``."""
    policy = Policy(
        full_label=args.full_label,
        sink_size=args.sink_size,
        recent_size=args.recent_size,
        gqa_rule=args.gqa,
    )
    with open_run(args.run) as run:
        asserted = {"name": args.model} if args.model is not None else {}
        check_run_model(run.model, {**asserted, **(args.heads or {})}, args.run)
        headmap = HeadMap.from_run(run, policy)
    kwargs = {"score": args.score, "threshold": args.threshold, "full_fraction": args.full_fraction}
    options = {"values": args.values, "index": args.index}
    for path in export(headmap, args.format, args.out, **kwargs, **options):
        print(f"wrote {path}")
    if args.format not in ("json", "head-scores"):
        selection = select_full(headmap, **kwargs)
        print(
            f"full attention: {int(selection.kv_full.sum())}/{selection.kv_full.size} KV heads "
            f"({selection.rule})"
        )
        if args.format == "duo" and args.values != "binary" and selection.tied_at_cut:
            print(
                "note: full and streaming KV heads tie at the cut; a consumer ranking these "
                "scores may break the tie the other way (--values binary writes this exact map)",
                file=sys.stderr,
            )


def run_evaluate_map(args: argparse.Namespace) -> None:
    """``workbench evaluate-map``."""
    import numpy as np

    policy = Policy(sink_size=args.sink_size, recent_size=args.recent_size, gqa_rule=args.gqa)
    with open_run(args.run) as run:
        headmap = HeadMap.from_run(run, policy)
    model = load(args.model or headmap.model.name, device=args.device)
    check_run_model(headmap.model, model.info, args.run)
    maps: dict[str, np.ndarray] = {}
    score = select_full(headmap, score=args.score, full_fraction=0.0).score
    if headmap.table(score).threshold is not None:
        selection = select_full(headmap, score=args.score)
        maps[selection.rule] = selection.kv_full
    for fraction in args.full_fractions:
        selection = select_full(headmap, score=args.score, full_fraction=fraction)
        if not any(np.array_equal(selection.kv_full, m) for m in maps.values()):
            maps[selection.rule] = selection.kv_full
    task = args.task if args.task != "auto" else (
        "toy-recall" if model.info.name == "toy-recall" else "prose"
    )  # fmt: skip
    try:
        if task == "toy-recall":
            trials = toy_recall_grid(args.lengths, args.depths, args.trials, seed=args.seed)
        else:
            if any(not 0 <= i < len(NEEDLES) for i in args.needle or []):
                raise WorkbenchError(f"--needle takes 0..{len(NEEDLES) - 1}, got {args.needle}")
            needles = [NEEDLES[i] for i in args.needle] if args.needle else args.needles
            trials = needle_grid(model.tokenizer, args.lengths, args.depths, needles, args.seed)
    except ValueError as e:
        raise WorkbenchError(str(e)) from None
    with tqdm(total=1, desc="evaluate-map", disable=args.quiet, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        frame = evaluate_map(
            model,
            maps,
            trials,
            sink_size=args.sink_size,
            recent_size=args.recent_size,
            random_seed=args.seed,
            max_new_tokens=args.max_new,
            prefill=args.prefill,
            progress=progress,
        )
    print(frame.to_string(index=False))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "handler"}
        document = {
            "model": model.info.name,
            "run": str(args.run),
            "machine": machine(),
            "task": task,
            "settings": settings,
            "rows": frame.to_dict("records"),
        }
        path = atomic_write_text(Path(args.out), json.dumps(document, indent=1) + "\n")
        print(f"wrote {path}")


def run_cache(args: argparse.Namespace) -> None:
    """``workbench cache``."""
    prompts = load_prompts(args.prompts)
    model = load(args.model, device=args.device)
    path = write_cache(
        model, prompts, args.hooks, args.out, max_tokens=args.max_tokens, progress=not args.quiet
    )
    print(f"cache file: {path}")


def run_train_toy(args: argparse.Namespace) -> None:
    """``workbench train-toy``."""
    out = train_toy(args.name, args.out, seed=args.seed, steps=args.steps, device=args.device)
    print(f"toy model: {out}")
