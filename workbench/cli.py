"""The ``workbench`` command.

Results go to stdout or files, progress to stderr. A user error (unknown model, bad file, bad
option) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.store import check_run_model, open_run

EXIT_USER_ERROR = 2


def _cmd_models(args: argparse.Namespace) -> None:
    from workbench.models import list_models

    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "installed" if r["installed"] else f"missing: {r['install']}"
        print(f"{r['name']:<{width}}  {state:<10}  {r['description']}")


def _cmd_scan(args: argparse.Namespace) -> None:
    import torch

    from workbench import distributed
    from workbench.errors import DistributedError
    from workbench.models import load
    from workbench.scanner import scan

    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.model).stem}.h5"
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
            probes=args.probes,
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
        print(f"run file: {result.path}")


def _device_map(text: str) -> str | dict[str, Any]:
    """A device-map strategy name or a JSON object ``{module name: device}``."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--device-map is not valid JSON: {e}") from e
    if text not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise argparse.ArgumentTypeError(
            f"--device-map takes auto, balanced, balanced_low_0, sequential or a JSON object, "
            f"not {text!r}"
        )
    return text


def _cmd_show(args: argparse.Namespace) -> None:
    from workbench.scanner import ScanResult

    with open_run(args.run) as run:
        names = args.scores.split(",") if args.scores else run.score_names
        tables = {name: run.score(name) for name in names}
        info = run.model
        inputs = ", ".join(f"{m} ({run.n_items(m)} items)" for m in run.measurement_names)
        print(
            f"{run.path}: {info.name} ({info.revision}), created {run.attrs['created']}; "
            f"measurements: {inputs}"
        )
    print(ScanResult(info, tables).summary())


def _cmd_export(args: argparse.Namespace) -> None:
    from workbench.export import export, select_full
    from workbench.headmap import HeadMap, Policy

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
    for path in export(headmap, args.format, args.out, **kwargs):
        print(f"wrote {path}")
    if args.format != "json":
        selection = select_full(headmap, **kwargs)
        print(
            f"full attention: {int(selection.kv_full.sum())}/{selection.kv_full.size} KV heads "
            f"({selection.rule})"
        )


def _head_counts(text: str) -> dict[str, int]:
    """``--heads L,H,KV`` (spaces allowed) as the model identity fields it asserts."""
    match = re.fullmatch(r" *([0-9]+) *, *([0-9]+) *, *([0-9]+) *", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected L,H,KV (three integers), got {text!r}")
    return dict(zip(("n_layers", "n_heads", "n_kv_heads"), map(int, match.groups()), strict=True))


def _cmd_evaluate_map(args: argparse.Namespace) -> None:
    import numpy as np
    from tqdm.auto import tqdm

    from workbench.atomic import atomic_write_text
    from workbench.export import select_full
    from workbench.headmap import HeadMap, Policy
    from workbench.models import load
    from workbench.serving import evaluate_map, machine
    from workbench.tasks.needle import NEEDLES, needle_grid, toy_recall_grid

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


def _numbers(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of numbers, not {text!r}"
            ) from None

    return parse


def _cmd_cache(args: argparse.Namespace) -> None:
    from workbench.cache import write_cache
    from workbench.models import load
    from workbench.tasks import load_prompts

    prompts = load_prompts(args.prompts)
    model = load(args.model, device=args.device)
    path = write_cache(
        model, prompts, args.hooks, args.out, max_tokens=args.max_tokens, progress=not args.quiet
    )
    print(f"cache file: {path}")


def _cmd_train_toy(args: argparse.Namespace) -> None:
    from workbench.toys import train_toy

    if args.steps is not None and args.steps < 1:
        raise WorkbenchError(f"--steps must be a positive number of steps, not {args.steps}")
    out = train_toy(args.name, args.out, seed=args.seed, steps=args.steps, device=args.device)
    print(f"toy model: {out}")


def _cmd_app(args: argparse.Namespace) -> None:
    try:
        from app import serve
    except ImportError as e:
        raise WorkbenchError(
            f"the explorer needs the app extra ({e}); "
            "run: pip install 'attention-head-workbench[app]'"
        ) from e

    dirs = [Path(r) for r in args.runs if Path(r).is_dir()]
    files = [Path(r) for r in args.runs if not Path(r).is_dir()]
    if len(dirs) > 1 or (dirs and args.runs_dir):
        raise WorkbenchError("give one runs directory (a directory argument or --runs-dir)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WorkbenchError(f"no such run file: {', '.join(missing)}")
    runs_dir = Path(args.runs_dir or (dirs[0] if dirs else "runs"))
    if not runs_dir.is_dir() and not files:
        raise WorkbenchError(
            f"no runs directory {runs_dir}; make a run first (workbench scan MODEL --out "
            f"{runs_dir}/x.h5) or pass run files: workbench app RUN.h5"
        )
    serve(runs_dir, files, host=args.host, port=args.port, device=args.device)


def _cmd_intervene(args: argparse.Namespace) -> None:
    from interventions.command import run

    run(args)


def _cmd_ioi(args: argparse.Namespace) -> None:
    from interventions.ioi import run_command

    run_command(args)


def _probe_option(text: str) -> tuple[str, Any]:
    """``key=value`` with value parsed as JSON, else a comma list of JSON items, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")

    def parse(item: str) -> Any:
        try:
            return json.loads(item)
        except json.JSONDecodeError:
            return item

    if "," in value and not value.lstrip().startswith(("[", "{")):
        return key, [parse(v) for v in value.split(",")]
    return key, parse(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Find what each attention head does, show it causally, export head maps.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], None], help: str):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    command("models", _cmd_models, "list the built-in models and whether each is installed")

    p = command("scan", _cmd_scan, "run head probes over a prompt set and write a run file")
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    p.add_argument("--prompts", default="demo", help="shipped prompt set or .jsonl/.txt file")
    p.add_argument(
        "--probes",
        default="default",
        help="'default' (probes of the scan's own prompts), 'all', or comma-separated names",
    )
    p.add_argument("--out", help="run file (default runs/<model>.h5)")
    p.add_argument("--max-tokens", type=int, help="truncate prompts to this many tokens")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per checkpoint")
    p.add_argument(
        "--path",
        choices=["auto", "pattern", "streamed"],
        default="auto",
        help="capture path (auto: patterns when short, streamed kernels when long)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        type=_probe_option,
        metavar="KEY=VALUE",
        help="probe option, repeatable; VALUE is JSON or a comma list (lengths=1024,2048)",
    )
    placement = p.add_mutually_exclusive_group()
    placement.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    placement.add_argument(
        "--device-map",
        type=_device_map,
        help="spread a model too large for one GPU over all visible ones: auto, balanced, "
        "sequential or JSON {module: device} (accelerate's device maps)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weight dtype (default float32; bfloat16 halves memory)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("show", _cmd_show, "print the score tables of a run file")
    p.add_argument("run", help="run file (.h5) written by `workbench scan`")
    p.add_argument("--scores", help="comma-separated score names (default: all)")

    p = command("export", _cmd_export, "export a run's head map for serving stacks")
    p.add_argument("run", help="run file (.h5) written by `workbench scan`")
    p.add_argument("--format", required=True, choices=["json", "duo", "layer-heads", "head-scores"])
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument(
        "--score", help="score deciding full attention (default: the one labelled --full-label)"
    )
    selection = p.add_mutually_exclusive_group()
    selection.add_argument(
        "--threshold",
        type=float,
        help="full when KV score > this (default: the score's own threshold)",
    )
    selection.add_argument("--full-fraction", type=float, help="share of KV heads kept full")
    p.add_argument(
        "--gqa",
        choices=["max", "mean"],
        default="max",
        help="query-head scores -> KV-head score (default max)",
    )
    p.add_argument("--full-label", default="retrieval", help="label that needs the full cache")
    p.add_argument("--sink-size", type=int, default=4, help="sink tokens for streaming heads")
    p.add_argument("--recent-size", type=int, default=256, help="recent window for streaming heads")
    p.add_argument("--model", help="refuse the run unless its model has this name")
    p.add_argument(
        "--heads",
        metavar="L,H,KV",
        type=_head_counts,
        help="refuse the run unless it has these layer, head and KV-head counts",
    )

    p = command(
        "evaluate-map",
        _cmd_evaluate_map,
        "simulate a run's head map as a serving KV-cache policy: needle accuracy vs KV kept",
    )
    p.add_argument("run", help="run file (.h5) with a retrieval (or --score) score table")
    p.add_argument("--model", help="model to load (default: the run's model name)")
    p.add_argument("--score", help="score deciding full heads (default: the --full-label one)")
    p.add_argument(
        "--full-fractions",
        type=_numbers(float),
        default=[0.1, 0.25, 0.5],
        help="shares of KV heads kept full, top by score (default 0.1,0.25,0.5); the score's "
        "own threshold is always tested too",
    )
    p.add_argument("--lengths", type=_numbers(int), default=[512, 1024, 2048])
    p.add_argument("--depths", type=_numbers(float), default=[0.25, 0.5, 0.75])
    p.add_argument("--needles", type=int, default=2, help="prose task: the first n needles")
    p.add_argument(
        "--needle",
        type=int,
        action="append",
        help="prose task: this needle only (index into workbench.tasks.needle.NEEDLES; repeatable)",
    )
    p.add_argument("--trials", type=int, default=4, help="toy-recall task: trials per cell")
    p.add_argument("--task", choices=["auto", "prose", "toy-recall"], default="auto")
    p.add_argument("--sink-size", type=int, default=4, help="sink tokens of streaming heads")
    p.add_argument("--recent-size", type=int, default=256, help="window of streaming heads")
    p.add_argument("--gqa", choices=["max", "mean"], default="max")
    p.add_argument("--max-new", type=int, default=40, help="tokens to decode per answer")
    p.add_argument("--seed", type=int, default=0, help="seed of trials and random maps")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", help="also write the table as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("cache", _cmd_cache, "write hook activations of a prompt set to an HDF5 cache")
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    p.add_argument("--prompts", required=True, help="shipped prompt set or .jsonl/.txt file")
    p.add_argument("--hooks", required=True, help="hook-name glob(s), e.g. 'blocks.*.attn.hook_z'")
    p.add_argument("--out", required=True, help="cache file to write (.h5)")
    p.add_argument("--max-tokens", type=int, help="truncate prompts to this many tokens")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("train-toy", _cmd_train_toy, "train a reference model with a known mechanism")
    p.add_argument("name", help="toy-bb, toy-recall or toy-ioi")
    p.add_argument("--out", help="checkpoint directory (default data/models/NAME)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init and batch order")
    p.add_argument("--steps", type=int, help="training steps (default: the shipped model's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    p = command("app", _cmd_app, "serve the Dash explorer of run files on 127.0.0.1")
    p.add_argument(
        "runs", nargs="*", metavar="RUN", help="run files to show, or the runs directory"
    )
    p.add_argument("--runs-dir", help="directory whose run files are listed (default runs/)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--device", help="device for model views (default: cuda when available)")

    p = command(
        "intervene", _cmd_intervene, "ablate, redistribute or patch heads and measure a task"
    )
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spec", help="intervention spec: JSON file or inline JSON (one or a list)")
    mode.add_argument("--sweep", metavar="KIND", help="apply KIND to each head alone (e.g. zero)")
    mode.add_argument("--self-repair", metavar="L.H,...", help="direct vs total effect per head")
    mode.add_argument(
        "--direct-effects", action="store_true", help="every head's direct effect (one pass)"
    )
    p.add_argument("--task", required=True, choices=["ioi", "needle", "loss", "toy"])
    p.add_argument(
        "--task-option", action="append", default=[], type=_probe_option, metavar="KEY=VALUE",
        help="task option, repeatable (n=32, length=4096, depths=0.1,0.5, seed=1)",
    )  # fmt: skip
    p.add_argument(
        "--option", action="append", default=[], type=_probe_option, metavar="KEY=VALUE",
        help="spec option for --sweep/--self-repair (factor=2, beta=0.4, sinks=[0])",
    )  # fmt: skip
    p.add_argument("--kind", default="zero", help="intervention kind for --self-repair")
    p.add_argument(
        "--heads", metavar="L.H,...",
        help="heads to sweep (default: all); with --spec, heads the random control never uses",
    )  # fmt: skip
    p.add_argument(
        "--scores", metavar="RUN",
        help="top-k heads of a run's score: swept, or (with --spec) kept out of the control",
    )  # fmt: skip
    p.add_argument("--score", help="score table name in --scores")
    p.add_argument("--top-k", type=int, help="how many top heads (default 10)")
    p.add_argument("--controls", type=int, default=3, help="random-head control draws (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of controls and bootstrap")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--path", choices=["auto", "pattern", "streamed"], default="auto")
    p.add_argument("--out", help="write the result as JSON")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("ioi", _cmd_ioi, "find an IOI-style circuit: head classes, edges, faithfulness")
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    p.add_argument(
        "--task", help="ioi, ioi-toy or colored-objects (default: ioi in the model's vocabulary)"
    )
    p.add_argument("--n", type=int, default=16, help="prompts (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (ABC twins: seed+1)")
    p.add_argument("--templates", metavar="I,J", help="template indices to draw from (default all)")
    p.add_argument("--exact-heads", type=int, default=64,
                   help="heads that get exact activation patching (default 64)")  # fmt: skip
    p.add_argument("--max-senders", type=int, default=30,
                   help="senders per path-patching step (default 30)")  # fmt: skip
    p.add_argument(
        "--rule", action="append", default=[], type=_probe_option, metavar="KEY=VALUE",
        help="override a class threshold (attend_io=0.3)",
    )  # fmt: skip
    p.add_argument("--no-checks", action="store_true", help="skip completeness and minimality")
    p.add_argument("--out", help="circuit JSON (default runs/MODEL-TASK-circuit.json)")
    p.add_argument("--run", metavar="RUN.h5", help="also store the circuit in this run file")
    p.add_argument("--plot", metavar="HTML", help="write the circuit graph as HTML")
    p.add_argument("--compare", metavar="CIRCUIT.json", help="report head overlap with a circuit")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.handler(args)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("workbench: stopped; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
