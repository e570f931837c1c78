"""Handlers of the interventions' commands (arguments in :mod:`interventions.cli`).

``workbench intervene``: evaluate a spec file, sweep heads, or measure self-repair on a task;
``workbench ioi``: find an IOI-style circuit, print its classes and write it.

Examples::

    workbench intervene smollm2-135m --spec spec.json --task ioi --task-option n=32
    workbench intervene smollm2-135m --sweep zero --task ioi --out sweep.json
    workbench intervene smollm2-135m --sweep uniform --task needle --task-option length=2048 \\
        --scores runs/smollm2.h5 --score retrieval --top-k 10
    workbench intervene smollm2-135m --self-repair 9.0,10.3 --task ioi
    workbench intervene smollm2-135m --direct-effects --task ioi --top-k 10
    workbench intervene smollm2-135m --knockout-curve --task needle --task-option length=512 \\
        --scores runs/smollm2.h5 --score retrieval --plot knockout.html

The table goes to stdout; ``--out`` writes the result as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from interventions.circuit import Circuit, overlap
from interventions.evaluation import (
    KNOCKOUT_KS,
    NoControlError,
    evaluate,
    knockout_curve,
    sweep,
    top_heads,
)
from interventions.ioi import Rules, find_circuit
from interventions.repair import direct_effects, self_repair
from interventions.specs import load_specs, parse_head
from workbench.atomic import atomic_write_text
from workbench.errors import InterventionError
from workbench.models import load
from workbench.store import check_run_model, open_run
from workbench.tasks import get_task


def _task(args: argparse.Namespace) -> Any:
    options = dict(args.task_option)
    if args.task == "toy" and "model_name" not in options:
        options["model_name"] = args.model
    return get_task(args.task, kind="metric", **options)


def _heads_option(args: argparse.Namespace, model: Any) -> list[Any] | None:
    if args.heads:
        return [parse_head(h) for h in args.heads.split(",")]
    if args.scores:
        return top_heads(_score_table(args, model), args.top_k or 10)
    return None


def _score_table(args: argparse.Namespace, model: Any) -> Any:
    """The score table ``--score`` of the run file ``--scores``, made with ``model``."""
    if not args.scores or not args.score:
        raise InterventionError("give --scores RUN and --score NAME (the score table to rank by)")
    with open_run(args.scores) as run:
        check_run_model(run.model, model.info, args.scores)
        return run.score(args.score)


def run_intervene(args: argparse.Namespace) -> None:
    """``workbench intervene`` (:mod:`interventions.cli` holds its arguments)."""
    modes = [args.spec, args.sweep, args.self_repair, args.direct_effects, args.knockout_curve]
    if len([m for m in modes if m]) != 1:
        raise InterventionError(
            "give exactly one of --spec, --sweep, --self-repair, --direct-effects, --knockout-curve"
        )
    if args.knockout_curve and (not args.scores or not args.score or args.controls < 1):
        raise InterventionError(
            "--knockout-curve needs --scores RUN, --score NAME and --controls >= 1 (random draws)"
        )
    options = dict(args.option)
    specs = load_specs(args.spec) if args.spec else None  # check the file before loading
    model = load(args.model, device=args.device)
    task = _task(args)
    common = {"batch_size": args.batch_size}
    if args.spec:
        exclude = _heads_option(args, model) or []  # --heads/--scores: heads the control avoids
        try:
            result = evaluate(model, task, specs, control=args.controls > 0,
                              n_controls=max(args.controls, 1), control_exclude=exclude,
                              seed=args.seed, path=args.path, progress=not args.quiet,
                              **common)  # fmt: skip
        except NoControlError as e:  # name the flag, not the API argument
            raise InterventionError(e.for_cli()) from None
        print(result.summary())
        payload = result.to_dict()
    elif args.knockout_curve:
        try:
            curve = knockout_curve(model, task, _score_table(args, model),
                                   ks=args.ks or KNOCKOUT_KS, kind=args.kind, options=options,
                                   n_controls=args.controls, seed=args.seed, path=args.path,
                                   progress=not args.quiet, **common)  # fmt: skip
        except NoControlError as e:
            raise InterventionError(e.for_cli()) from None
        print(curve.summary())
        payload = curve.to_dict()
        if args.plot:
            page = curve.plot().to_html(include_plotlyjs="cdn")
            print(f"figure: {atomic_write_text(Path(args.plot), page)}")
    elif args.sweep:
        frame = sweep(model, task, _heads_option(args, model), kind=args.sweep, options=options,
                      seed=args.seed, path=args.path, progress=not args.quiet,
                      **common)  # fmt: skip
        print(f"sweep {args.sweep} on {task.name}: baseline {frame.attrs['baseline']}")
        print(frame.to_string(index=False, float_format="{:.4f}".format))
        payload = {"baseline": frame.attrs["baseline"], "kind": args.sweep, "task": task.name,
                   "rows": frame.to_dict(orient="records")}  # fmt: skip
    elif args.direct_effects:
        frame = direct_effects(model, task, **common)
        print(f"direct effects on {task.name}, metric {frame.attrs['metric']}")
        shown = frame.head(args.top_k) if args.top_k else frame
        print(shown.to_string(index=False, float_format="{:.4f}".format))
        payload = {"metric": frame.attrs["metric"], "task": task.name,
                   "rows": frame.to_dict(orient="records")}  # fmt: skip
    else:
        heads = [parse_head(h) for h in args.self_repair.split(",")]
        frame = self_repair(model, task, heads, kind=args.kind, options=options, **common)
        print(f"self-repair ({args.kind}) on {task.name}, metric {frame.attrs['metric']}")
        print(frame.to_string(index=False, float_format="{:.4f}".format))
        payload = {"metric": frame.attrs["metric"], "kind": args.kind, "task": task.name,
                   "rows": frame.to_dict(orient="records")}  # fmt: skip
    if args.out:
        payload["model"] = model.info.to_dict()
        path = atomic_write_text(Path(args.out), json.dumps(payload, indent=1, default=float))
        print(f"wrote {path}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_ioi(args: argparse.Namespace) -> None:
    """``workbench ioi MODEL``: find the circuit, print the classes table, write the circuit."""
    overrides = dict(args.rule)
    unknown = set(overrides) - set(Rules.__dataclass_fields__)
    if unknown:
        raise InterventionError(
            f"unknown rule threshold(s) {sorted(unknown)}; choose from "
            f"{sorted(Rules.__dataclass_fields__)}"
        )
    bad = {k: v for k, v in overrides.items() if not _is_finite_number(v)}
    if bad:
        raise InterventionError(f"--rule thresholds must be finite numbers, got {bad}")
    rules = Rules(**{k: float(v) for k, v in overrides.items()})
    templates = args.templates
    other = Circuit.load(args.compare) if args.compare else None  # checked before the work
    model = load(args.model, device=args.device)
    started = time.time()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    circuit = find_circuit(
        model,
        task=args.task,
        n=args.n,
        seed=args.seed,
        templates=templates,
        rules=rules,
        exact_heads=args.exact_heads,
        max_senders=args.max_senders,
        checks=not args.no_checks,
        log=log,
    )
    circuit.metrics["seconds"] = round(time.time() - started, 1)
    print(circuit.summary())
    for note in circuit.notes:
        print(f"note: {note}")
    out = Path(args.out or f"runs/{model.info.name}-{circuit.task['task']}-circuit.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    circuit.save(out)
    print(f"circuit: {out}")
    if args.run:
        circuit.store(args.run)
        print(f"stored in run file {args.run} as circuits/{circuit.task['task']}")
    if args.plot:
        atomic_write_text(Path(args.plot), circuit.plot().to_html(include_plotlyjs="cdn"))
        print(f"graph: {args.plot}")
    if other is not None:
        shared = overlap(circuit, other)
        print(
            f"overlap with {args.compare} ({shared['b']}): {shared['n_shared']} shared heads, "
            f"{shared['share_of_a']:.0%} of this circuit, {shared['share_of_b']:.0%} of the "
            f"other, Jaccard {shared['jaccard']:.2f}"
        )
