"""``workbench intervene``: evaluate a spec file, sweep heads, or measure self-repair on a task.

Examples::

    workbench intervene smollm2-135m --spec spec.json --task ioi --task-option n=32
    workbench intervene smollm2-135m --sweep zero --task ioi --out sweep.json
    workbench intervene smollm2-135m --sweep uniform --task needle --task-option length=2048 \\
        --scores runs/smollm2.h5 --score retrieval --top-k 10
    workbench intervene smollm2-135m --self-repair 9.0,10.3 --task ioi
    workbench intervene smollm2-135m --direct-effects --task ioi --top-k 10

The table goes to stdout; ``--out`` writes the result as JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from workbench.atomic import atomic_write_text
from workbench.errors import InterventionError
from workbench.store import check_run_model, open_run
from workbench.tasks import get_task


def _task(args: argparse.Namespace) -> Any:
    options = dict(args.task_option)
    if args.task == "toy" and "model_name" not in options:
        options["model_name"] = args.model
    return get_task(args.task, kind="metric", **options)


def _heads_option(args: argparse.Namespace, model: Any) -> list[Any] | None:
    from interventions.evaluate import top_heads
    from interventions.specs import parse_head

    if args.heads:
        return [parse_head(h) for h in args.heads.split(",")]
    if args.scores:
        if not args.score:
            raise InterventionError("--scores needs --score NAME (the score table to rank by)")
        with open_run(args.scores) as run:
            check_run_model(run.model, model.info, args.scores)
            table = run.score(args.score)
        return top_heads(table, args.top_k or 10)
    return None


def run(args: argparse.Namespace) -> None:
    """The subcommand's handler (``workbench.cli`` parses the arguments)."""
    from interventions.evaluate import evaluate, sweep
    from interventions.self_repair import direct_effects, self_repair
    from interventions.specs import load_specs
    from workbench.models import load

    modes = [m for m in (args.spec, args.sweep, args.self_repair, args.direct_effects) if m]
    if len(modes) != 1:
        raise InterventionError(
            "give exactly one of --spec, --sweep, --self-repair, --direct-effects"
        )
    options = dict(args.option)
    specs = load_specs(args.spec) if args.spec else None  # check the file before loading
    model = load(args.model, device=args.device)
    task = _task(args)
    common = {"batch_size": args.batch_size}
    if args.spec:
        exclude = _heads_option(args, model) or []  # --heads/--scores: heads the control avoids
        result = evaluate(model, task, specs, control=args.controls > 0,
                          n_controls=max(args.controls, 1), control_exclude=exclude,
                          seed=args.seed, path=args.path, progress=not args.quiet,
                          **common)  # fmt: skip
        print(result.summary())
        payload = result.to_dict()
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
        from interventions.specs import parse_head

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
