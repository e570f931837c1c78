"""The ``workbench`` command: one parser, with the subcommands every package registers.

``workbench models`` is answered here (:mod:`workbench.builtins` needs no torch). Each package
lists its subcommands as :class:`~workbench.arguments.Command` objects in a ``cli``
module: the core's and the scanner's below (handlers in :mod:`workbench.commands`), the
interventions' in :mod:`interventions.cli`, the explorer's in :mod:`app.cli`. Those modules
import only argparse and :mod:`workbench.arguments`; a command's handler module (torch,
transformers, ...) is imported when that command runs, so ``workbench --help`` starts at once.

Results go to stdout or files, progress to stderr. A user error (unknown model, bad file, bad
option) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from app import cli as app_cli
from interventions import cli as interventions_cli
from workbench.arguments import (
    Command,
    Parser,
    device,
    device_map,
    head_counts,
    integer,
    key_value,
    names,
    number_list,
    output_dir,
    output_file,
    real,
)
from workbench.builtins import list_models
from workbench.errors import WorkbenchError

EXIT_USER_ERROR = 2


def _models_arguments(p: argparse.ArgumentParser) -> None:
    """No arguments."""


def _scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    p.add_argument("--prompts", default="demo", help="shipped prompt set or .jsonl/.txt file")
    p.add_argument(
        "--probes",
        type=names,
        default=["default"],
        help="'default' (probes of the scan's own prompts), 'all', or comma-separated names",
    )
    p.add_argument("--out", type=output_file, help="run file (default runs/<model>.h5)")
    p.add_argument("--max-tokens", type=integer(1), help="truncate prompts to this many tokens")
    p.add_argument("--batch-size", type=integer(1), default=4, help="prompts per checkpoint")
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
        type=key_value,
        metavar="KEY=VALUE",
        help="probe option, repeatable; VALUE is JSON or a comma list (lengths=1024,2048)",
    )
    placement = p.add_mutually_exclusive_group()
    placement.add_argument(
        "--device", type=device, help="cpu, cuda, ... (default: cuda when available)"
    )
    placement.add_argument(
        "--device-map",
        type=device_map,
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


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run file (.h5) written by `workbench scan`")
    p.add_argument("--scores", type=names, help="comma-separated score names (default: all)")
    p.add_argument(
        "--summary",
        action="store_true",
        help="the compact summary `workbench scan` prints instead of the layer x head grids",
    )


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run file (.h5) written by `workbench scan`")
    p.add_argument(
        "--format", required=True, choices=["json", "duo", "layer-heads", "moa", "head-scores"]
    )
    p.add_argument("--out", required=True, type=output_dir, help="directory to write into")
    p.add_argument(
        "--values",
        choices=["scores", "binary"],
        help="duo: KV scores normalised to [0, 1], which consumers rank (default), or 1/0",
    )
    p.add_argument(
        "--index",
        choices=["kv", "query"],
        help="layer-heads: list KV-head indices (default; RazorAttention reads these) or the "
        "query heads of full KV heads",
    )
    p.add_argument(
        "--score", help="score deciding full attention (default: the one labelled --full-label)"
    )
    selection = p.add_mutually_exclusive_group()
    selection.add_argument(
        "--threshold",
        type=real(),
        help="full when KV score > this (default: the score's own threshold)",
    )
    selection.add_argument("--full-fraction", type=real(0, 1), help="share of KV heads kept full")
    p.add_argument(
        "--gqa",
        choices=["max", "mean"],
        default="max",
        help="query-head scores -> KV-head score (default max)",
    )
    p.add_argument("--full-label", default="retrieval", help="label that needs the full cache")
    p.add_argument(
        "--sink-size", type=integer(0), default=4, help="sink tokens for streaming heads"
    )
    p.add_argument(
        "--recent-size", type=integer(1), default=256, help="recent window for streaming heads"
    )
    p.add_argument("--model", help="refuse the run unless its model has this name")
    p.add_argument(
        "--heads",
        metavar="L,H,KV",
        type=head_counts,
        help="refuse the run unless it has these layer, head and KV-head counts",
    )


def _evaluate_map_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run file (.h5) with a retrieval (or --score) score table")
    p.add_argument("--model", help="model to load (default: the run's model name)")
    p.add_argument("--score", help="score deciding full heads (default: the --full-label one)")
    p.add_argument(
        "--full-fractions",
        type=number_list(float, 0, 1),
        default=[0.1, 0.25, 0.5],
        help="shares of KV heads kept full, top by score (default 0.1,0.25,0.5); the score's "
        "own threshold is always tested too",
    )
    p.add_argument("--lengths", type=number_list(int, 1), default=[512, 1024, 2048])
    p.add_argument("--depths", type=number_list(float, 0, 1), default=[0.25, 0.5, 0.75])
    p.add_argument("--needles", type=integer(1), default=2, help="prose task: the first n needles")
    p.add_argument(
        "--needle",
        type=integer(0),
        action="append",
        help="prose task: this needle only (index into workbench.tasks.needle.NEEDLES; repeatable)",
    )
    p.add_argument("--trials", type=integer(1), default=4, help="toy-recall task: trials per cell")
    p.add_argument("--task", choices=["auto", "prose", "toy-recall"], default="auto")
    p.add_argument("--sink-size", type=integer(0), default=4, help="sink tokens of streaming heads")
    p.add_argument("--recent-size", type=integer(1), default=256, help="window of streaming heads")
    p.add_argument(
        "--prefill",
        choices=["exact", "streamed"],
        default="streamed",
        help="streamed: the policy from the first token on (DuoAttention); exact: the context is "
        "prefilled exactly and the question and answer see the compressed cache (kvpress)",
    )
    p.add_argument("--gqa", choices=["max", "mean"], default="max")
    p.add_argument("--max-new", type=integer(1), default=40, help="tokens to decode per answer")
    p.add_argument(
        "--seed", type=integer(0, 2**32 - 1), default=0, help="seed of trials and random maps"
    )
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", type=output_file, help="also write the table as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, HF directory, .gguf file or hub name")
    p.add_argument("--prompts", required=True, help="shipped prompt set or .jsonl/.txt file")
    p.add_argument("--hooks", required=True, help="hook-name glob(s), e.g. 'blocks.*.attn.hook_z'")
    p.add_argument("--out", required=True, type=output_file, help="cache file to write (.h5)")
    p.add_argument("--max-tokens", type=integer(1), help="truncate prompts to this many tokens")
    p.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_toy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="toy-bb, toy-recall or toy-ioi")
    p.add_argument("--out", type=output_dir, help="checkpoint directory (default data/models/NAME)")
    p.add_argument(
        "--seed", type=integer(0, 2**32 - 1), default=0, help="seed of data, init and batch order"
    )
    p.add_argument("--steps", type=integer(1), help="training steps (default: the shipped model's)")
    p.add_argument("--device", type=device, help="cpu or cuda (default: cuda when available)")


COMMANDS = [
    Command(
        "models",
        "list the built-in models and whether each is installed",
        "workbench.cli:run_models",
        _models_arguments,
    ),
    Command(
        "scan",
        "run head probes over a prompt set and write a run file",
        "workbench.commands:run_scan",
        _scan_arguments,
    ),
    Command(
        "show",
        "print the score tables of a run file as layer x head grids (--summary: compact)",
        "workbench.commands:run_show",
        _show_arguments,
    ),
    Command(
        "export",
        "export a run's head map for serving stacks",
        "workbench.commands:run_export",
        _export_arguments,
    ),
    Command(
        "evaluate-map",
        "simulate a run's head map as a serving KV-cache policy: needle accuracy vs KV kept",
        "workbench.commands:run_evaluate_map",
        _evaluate_map_arguments,
    ),
    Command(
        "cache",
        "write hook activations of a prompt set to an HDF5 cache",
        "workbench.commands:run_cache",
        _cache_arguments,
    ),
    Command(
        "train-toy",
        "train a reference model with a known mechanism",
        "workbench.commands:run_train_toy",
        _train_toy_arguments,
    ),
]


def run_models(args: argparse.Namespace) -> None:
    """``workbench models``."""
    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "installed" if r["installed"] else f"missing: {r['install']}"
        print(f"{r['name']:<{width}}  {state:<10}  {r['description']}")


# Every package's commands, in the order ``workbench --help`` lists them.
ALL_COMMANDS: list[Command] = [*COMMANDS, *app_cli.COMMANDS, *interventions_cli.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="workbench",
        description="Find what each attention head does, show it causally, export head maps.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in ALL_COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(p)
        p.set_defaults(handler=command.handler)
    return parser


def handler(spec: str) -> Callable[[argparse.Namespace], None]:
    """The function a command's ``"package.module:function"`` names, its module imported now."""
    module, _, function = spec.partition(":")
    try:
        return getattr(import_module(module), function)
    except ImportError as e:
        raise WorkbenchError(
            f"this command needs {e.name or e}, which is not installed; run: pip install "
            "'attention-head-workbench[dev]' (or the extra that names it)"
        ) from e


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        handler(args.handler)(args)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("workbench: stopped; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
