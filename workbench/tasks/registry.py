"""The task registry: every named task of the workbench and the one lookup, :func:`get_task`.

A *task* is a named, seeded source of model inputs together with what a model should do on
them. Each task is registered where it is defined, with the *kinds* of consumer it serves:

* ``metric``: a :class:`~workbench.tasks.metric.Task` (equal-length batches and per-example
  metrics), the input of the evaluation loop (``interventions.evaluate``,
  ``workbench intervene --task``): ``ioi``, ``needle``, ``loss``, ``toy``, ``next-token``, and
  the templated tasks below;
* ``templated``: a metric task drawn from a templated task, with corrupted twins and the token
  positions of the roles ``IO``/``S1``/``S2``/``END``
  (:class:`~workbench.tasks.metric.TemplatedMetric`), the input of circuit discovery
  (``workbench ioi --task``): ``ioi``, ``ioi-toy``, ``colored-objects``;
* ``toy``: a :class:`~workbench.tasks.toy.ToyTask`, the seeded generator a ``toy-*`` reference
  model is trained and measured on: ``toy-bb``, ``toy-recall``, ``toy-ioi``.

>>> get_task("needle", length=4096).length                  # a metric task
4096
>>> get_task("ioi-toy", kind="templated", n=8).templated.name  # refused if not templated
'ioi-toy'
>>> task_names("toy")
['toy-bb', 'toy-ioi', 'toy-recall']

Options are checked before anything is built, against the signature and type hints of the
registered class or function: an unknown task name, a task of another kind, an unknown or
missing option, or an option of the wrong type raises :class:`~workbench.errors.TaskBuildError`
(the CLI prints it as one line). Prompt sets (:func:`workbench.tasks.prompts.load_prompts`) are
not tasks: they are plain texts to scan, named by a shipped name or a file.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from workbench.errors import TaskBuildError

KINDS = ("metric", "templated", "toy")
Factory = TypeVar("Factory", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskEntry:
    """One registered task: ``make(**fixed, **options)`` builds it; ``kinds`` say who can use
    it; ``fixed`` options are part of the entry (``ioi-toy`` is ``ioi`` with ``toy=True``) and
    cannot be overridden."""

    name: str
    make: Callable[..., Any]
    kinds: tuple[str, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, inspect.Parameter]:
        """The options a caller may pass, by name."""
        params = inspect.signature(self.make).parameters
        return {k: p for k, p in params.items() if k not in self.fixed}


_ENTRIES: dict[str, TaskEntry] = {}


def register(
    name: str, *kinds: str, fixed: Mapping[str, Any] | None = None
) -> Callable[[Factory], Factory]:
    """Class or function decorator: register ``name`` as built by the decorated callable."""
    unknown = set(kinds) - set(KINDS)
    if not kinds or unknown:
        raise ValueError(f"task {name!r}: kinds must be some of {KINDS}, got {kinds}")

    def add(make: Factory) -> Factory:
        if name in _ENTRIES:
            raise ValueError(f"task {name!r} is registered twice")
        _ENTRIES[name] = TaskEntry(name, make, tuple(kinds), dict(fixed or {}))
        return make

    return add


def task_names(kind: str | None = None) -> list[str]:
    """Registered task names (of one kind, when given), sorted."""
    return sorted(n for n, e in _ENTRIES.items() if kind is None or kind in e.kinds)


def get_task(name: str, /, kind: str | None = None, **options: Any) -> Any:
    """The task registered as ``name``, built with ``options``.

    ``kind`` (``"metric"``, ``"templated"``, ``"toy"``) refuses entries that cannot serve that
    consumer. Raises :class:`~workbench.errors.TaskBuildError` on an unknown name or kind, an
    unknown, fixed or missing option, or an option value of the wrong type.
    """
    if kind is not None and kind not in KINDS:
        raise TaskBuildError(f"unknown task kind {kind!r}; kinds: {', '.join(KINDS)}")
    entry = _ENTRIES.get(name) if isinstance(name, str) else None
    if entry is None or (kind is not None and kind not in entry.kinds):
        what = f"{kind} task" if kind else "task"
        raise TaskBuildError(f"unknown {what} {name!r}; {what}s: {', '.join(task_names(kind))}")
    accepted = entry.options()
    fixed = sorted(set(options) & set(entry.fixed))
    if fixed:
        raise TaskBuildError(f"task {name!r} fixes {', '.join(fixed)}; leave it out")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TaskBuildError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"options: {', '.join(accepted) or 'none'}"
        )
    missing = [k for k, p in accepted.items() if p.default is p.empty and k not in options]
    if missing:
        raise TaskBuildError(f"task {name!r} needs option(s) {', '.join(missing)}")
    hints = _type_hints(entry.make)
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            raise TaskBuildError(
                f"task {name!r}: option {key}={value!r} should be {_describe(hints[key])}"
            )
    return entry.make(**entry.fixed, **options)


def _type_hints(make: Callable[..., Any]) -> dict[str, Any]:
    """Resolved type hints of a factory's parameters (a dataclass's fields, a class's
    ``__init__``, a function's own)."""
    plain_class = isinstance(make, type) and not dataclasses.is_dataclass(make)
    return typing.get_type_hints(make.__init__ if plain_class else make)


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` names. Checked: ``int``, ``float`` (ints too),
    ``bool``, ``str``, ``None``, unions, and sequences (a list or tuple, item by item); any
    other hint is taken on trust."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, tuple | list):
            return False
        item = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(v, item) for v in value)
    return True


def _describe(hint: Any) -> str:
    """``hint`` in words for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin in (tuple, list, Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return getattr(hint, "__name__", str(hint))
