"""Package namespaces that resolve on first use (PEP 562).

``import workbench``, ``import interventions`` and ``import app`` must stay cheap: the CLI imports
each package's ``cli`` module to build its parser, and the core imports ``workbench.<module>``,
which runs ``workbench/__init__.py`` first. A package therefore lists its public names and the
module defining each; :func:`lazy_exports` gives it the module-level ``__getattr__`` and
``__dir__`` that import that module when a name is first used.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose globals are ``namespace``; ``exports``
    maps each public name to the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
