"""Command-line building blocks shared by every package that registers ``workbench`` commands.

A package adds subcommands by listing :class:`Command` objects in its ``cli`` module
(``workbench/cli.py``, ``interventions/cli.py``, ``app/cli.py``). A command names its handler as
``"package.module:function"``; the CLI imports that module only when the command runs, so
``workbench --help`` never pays for torch. The argument types below turn a malformed value into
argparse's one-line usage error (exit code 2) instead of a traceback.

This module imports nothing but the standard library: every ``cli`` module imports it.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Command", "device_map", "head_counts", "key_value", "number_list"]


@dataclass(frozen=True)
class Command:
    """One ``workbench`` subcommand: its name and help, the function that adds its arguments,
    and its handler ``"package.module:function"`` (called with the parsed namespace)."""

    name: str
    help: str
    handler: str
    arguments: Callable[[argparse.ArgumentParser], None]


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON, else a comma list of JSON items, else a string."""
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


def number_list(kind: type) -> Callable[[str], list]:
    """An argument type: a comma list of ``kind`` numbers (``512,1024``)."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of numbers, not {text!r}"
            ) from None

    return parse


def device_map(text: str) -> str | dict[str, Any]:
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


def head_counts(text: str) -> dict[str, int]:
    """``--heads L,H,KV`` (spaces allowed) as the model identity fields it asserts."""
    match = re.fullmatch(r" *([0-9]+) *, *([0-9]+) *, *([0-9]+) *", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected L,H,KV (three integers), got {text!r}")
    return dict(zip(("n_layers", "n_heads", "n_kv_heads"), map(int, match.groups()), strict=True))
