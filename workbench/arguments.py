"""Command-line building blocks shared by every package that registers ``workbench`` commands.

A package adds subcommands by listing :class:`Command` objects in its ``cli`` module
(``workbench/cli.py``, ``interventions/cli.py``, ``app/cli.py``). A command names its handler as
``"package.module:function"``; the CLI imports that module only when the command runs, so
``workbench --help`` never pays for torch.

This is the validation layer of the command line: every argument is parsed by a declared type
and range, before anything is loaded. :class:`Parser` prints a usage error as one line on
stderr (exit code 2); the types below turn a malformed value into such an error instead of a
traceback or a silent reinterpretation: :func:`integer` and :func:`real` (finite, in a range),
:func:`number_list`, :func:`names`, :func:`device`, :func:`output_file` and :func:`output_dir`
(checked writable before any work, :func:`workbench.atomic.check_output`), :func:`key_value`.

>>> integer(1)("8"), real(0, 1)("0.25"), names("sink, entropy")
(8, 0.25, ['sink', 'entropy'])
>>> integer(1)("0")
Traceback (most recent call last):
argparse.ArgumentTypeError: expected an integer >= 1, got '0'

This module imports nothing but the standard library and :mod:`workbench.atomic` (itself
standard library only): every ``cli`` module imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from workbench.atomic import check_output
from workbench.errors import OutputError

__all__ = [
    "Command",
    "Parser",
    "device",
    "device_map",
    "head_counts",
    "integer",
    "key_value",
    "names",
    "number_list",
    "output_dir",
    "output_file",
    "real",
]


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line on stderr (then exit code 2), as every
    other user error of the CLI: ``workbench scan: error: argument --batch-size: expected an
    integer >= 1, got '0' (workbench scan --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} ({self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # argparse drops a "--" given as an option's value (``--heads=--``) and then hands
        # the option an empty list without calling its type: refuse it instead
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return super()._get_values(action, arg_strings)


@dataclass(frozen=True)
class Command:
    """One ``workbench`` subcommand: its name and help, the function that adds its arguments,
    and its handler ``"package.module:function"`` (called with the parsed namespace)."""

    name: str
    help: str
    handler: str
    arguments: Callable[[argparse.ArgumentParser], None]


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON, else a comma list of JSON items, else a string.
    Whether the key exists and the value fits is the consumer's check (task options:
    ``workbench.tasks.get_task``; probe options: ``workbench.probe.ScanContext``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {_show(text)}")

    def parse(item: str) -> Any:
        try:
            return json.loads(item)
        except json.JSONDecodeError:
            return item
        except (ValueError, RecursionError) as e:  # too many digits, too deep
            raise argparse.ArgumentTypeError(f"{key}: value is not usable JSON ({e})") from None

    if "," in value and not value.lstrip().startswith(("[", "{")):
        return key, [parse(v) for v in value.split(",")]
    return key, parse(value)


def _show(text: str, limit: int = 60) -> str:
    """``repr(text)`` cut to ``limit`` characters, so an error stays one short line."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _bounds(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" in [{low:g}, {high:g}]"
    if low is not None:
        return f" >= {low:g}"
    return f" <= {high:g}" if high is not None else ""


_INTEGER = re.compile(r" *[+-]?[0-9]{1,18} *")


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argument type: a decimal integer in ``[low, high]`` (either end open when None).
    ``1.0``, ``1e3`` and 5000-digit numbers are refused, not rounded or overflowed."""

    def parse(text: str) -> int:
        value = int(text) if _INTEGER.fullmatch(text) else None
        if (
            value is None
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(
                f"expected an integer{_bounds(low, high)}, got {_show(text)}"
            )
        return value

    parse.__name__ = "integer"
    return parse


def real(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """An argument type: a finite number in ``[low, high]`` (NaN and infinities refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(
                f"expected a finite number{_bounds(low, high)}, got {_show(text)}"
            )
        return value

    parse.__name__ = "number"
    return parse


def number_list(
    kind: type, low: float | None = None, high: float | None = None
) -> Callable[[str], list]:
    """An argument type: a non-empty comma list of ``kind`` (int or float) numbers in
    ``[low, high]`` (``512,1024``), each checked as :func:`integer` or :func:`real` checks
    one."""
    item = integer(low, high) if kind is int else real(low, high)

    def parse(text: str) -> list:
        values = [v for v in text.split(",") if v.strip()]
        try:
            if not values:
                raise argparse.ArgumentTypeError("")
            return [item(v) for v in values]
        except argparse.ArgumentTypeError:
            what = "integers" if kind is int else "finite numbers"
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {what}{_bounds(low, high)}, got {_show(text)}"
            ) from None

    parse.__name__ = "list"
    return parse


def names(text: str) -> list[str]:
    """A non-empty comma list of names (``sink,entropy``); empty items are refused."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {_show(text)}")
    return items


_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|meta)(:[0-9]{1,3})?")


def device(text: str) -> str:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``...); whether this machine
    has it is checked when the model is placed (:func:`workbench.placement.resolve`)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:1, got {_show(text)}"
        )
    return text


def output_file(text: str) -> str:
    """A file to write: refused at once when a directory is in the way, a parent is a file, or
    the place cannot be written (:func:`workbench.atomic.check_output`)."""
    return _output(text, directory=False)


def output_dir(text: str) -> str:
    """A directory to write into, checked as :func:`output_file` checks a file."""
    return _output(text, directory=True)


def _output(text: str, *, directory: bool) -> str:
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {_show(text)}")
    try:
        check_output(Path(text), directory=directory)
    except OutputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except OSError as e:  # a name too long, a loop of links
        raise argparse.ArgumentTypeError(f"cannot write {_show(text)}: {e.strerror}") from None
    return text


def device_map(text: str) -> str | dict[str, Any]:
    """A device-map strategy name or a JSON object ``{module name: device}``."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise argparse.ArgumentTypeError(f"--device-map is not valid JSON: {e}") from None
        if not isinstance(value, dict) or not all(
            isinstance(v, int | str) and not isinstance(v, bool) for v in value.values()
        ):
            raise argparse.ArgumentTypeError(
                f"--device-map takes {{module name: device}} (a GPU index or a device name), "
                f"got {_show(text)}"
            )
        return value
    if text not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise argparse.ArgumentTypeError(
            f"--device-map takes auto, balanced, balanced_low_0, sequential or a JSON object, "
            f"not {text!r}"
        )
    return text


def head_counts(text: str) -> dict[str, int]:
    """``--heads L,H,KV`` (spaces allowed) as the model identity fields it asserts."""
    match = re.fullmatch(r" *([0-9]{1,9}) *, *([0-9]{1,9}) *, *([0-9]{1,9}) *", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected L,H,KV (three integers), got {_show(text)}")
    return dict(zip(("n_layers", "n_heads", "n_kv_heads"), map(int, match.groups()), strict=True))
