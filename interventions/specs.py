"""Intervention specs: head-level interventions as data that round-trips through JSON.

Each spec names the heads it touches (``(layer, head)`` pairs, query heads) and optionally the
query positions it applies at (negative positions count from the end; None = every position).
A list of specs is applied together; within a layer, the pattern-level kinds act first (they
decide what the head reads), then the output-level kinds (they replace what it writes), each
class in list order.

The kinds are kept apart because the literature uses "ablation" for all of them:

=================  =========  ===============================================================
kind               acts on    what the head's output becomes
=================  =========  ===============================================================
``zero``           output     0 (zero ablation)
``mean``           output     its mean output over the task's reference prompts (all tokens)
``resample``       output     its output on another prompt: the task's ``corrupted`` variant
                              (Wang et al. 2022's ABC distribution) or ``shuffled`` (the next
                              prompt of the same batch; resample ablation, Chan et al. 2022)
``scale``          output     ``factor`` × its output (amplify > 1, attenuate < 1)
``patch_output``   output     its output in a reference run (``source``, e.g. the clean
                              prompt while the target run is corrupted): activation patching
``uniform``        pattern    uniform attention over the visible keys (Wu et al. 2024's
                              "masking": their code zeroes the query, which makes the row
                              uniform); the head still reads the values
``first_token``    pattern    all attention on key 0 (the head parks on its sink)
``redistribute``   pattern    ACT (Yu et al. 2024, GATECH-EIC/ACT): the attention on the sink
                              keys is scaled by ``beta`` and the freed mass is handed to the
                              other keys in proportion to their attention; with ``receivers``
                              (VAR) the mass goes only to those key spans
``patch_pattern``  pattern    its attention pattern from a reference run, applied to the
                              values of the target run
=================  =========  ===============================================================

JSON form: ``{"kind": "zero", "heads": [[9, 9], [10, 0]]}``; heads may also be written
``"9.9"`` or ``{"layer": 9, "head": 9}``. A file holds one spec or a list of them.

Every field is checked when a spec is made, by its declared type, and nothing is coerced: layers,
heads, positions and sinks are integers (``0.9``, ``true`` or ``"1"`` are refused, not read as
0 or 1), ``factor``, ``beta`` and ``threshold`` finite numbers in their ranges,
``exclude_first`` a JSON boolean, ``source`` a string; an unknown kind or field is refused with
the closest known name. Whatever is wrong raises :class:`~workbench.errors.InterventionError`,
with a one-line message. What depends on the prompts (a sink position beyond the prompt) is
checked when the spec is applied (:meth:`Redistribute.check_keys`).

>>> spec = spec_from_dict({"kind": "scale", "heads": ["9.9", [10, 0]], "factor": 2.0})
>>> spec.heads
((9, 9), (10, 0))
>>> load_specs(dump_specs([spec])) == [spec]
True
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from workbench.errors import InterventionError

__all__ = [
    "KINDS",
    "FirstTokenAttention",
    "Head",
    "Intervention",
    "MeanAblation",
    "PatchOutput",
    "PatchPattern",
    "Redistribute",
    "ResampleAblation",
    "ScaleOutput",
    "UniformAttention",
    "ZeroAblation",
    "dump_specs",
    "load_specs",
    "parse_head",
    "spec_from_dict",
    "spec_source",
]

Head = tuple[int, int]  # (layer, query head)


MAX_INDEX = 2**31  # no model has more layers, heads or positions: a bigger number is a typo


def parse_head(value: Any) -> Head:
    """``[l, h]``, ``(l, h)``, ``"l.h"``, ``"l-h"`` or ``{"layer": l, "head": h}`` → ``(l, h)``,
    both integers >= 0 (an integral float or a bool is not a head index)."""
    pair: list[Any] = []
    if isinstance(value, dict) and set(value) == {"layer", "head"}:
        pair = [value["layer"], value["head"]]
    elif isinstance(value, str):
        match = re.fullmatch(r" *(-?[0-9]{1,9}) *[.-] *(-?[0-9]{1,9}) *", value)
        pair = [int(g) for g in match.groups()] if match else []
    elif isinstance(value, Sequence):
        pair = list(value)
    if len(pair) != 2 or not all(_is_int(p) for p in pair):
        raise InterventionError(
            "a head is [layer, head] (two integers), 'layer.head' or {'layer': l, 'head': h}; "
            f"got {_show(value)}"
        )
    layer, head = (int(p) for p in pair)
    if not (0 <= layer < MAX_INDEX and 0 <= head < MAX_INDEX):
        raise InterventionError(f"layer and head must be >= 0 and < 2**31, got {_show(value)}")
    return layer, head


def _is_int(value: Any) -> bool:
    """An integer that is no bool (``numbers.Integral``: Python and NumPy integers)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number that is no bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integers(value: Any, what: str) -> tuple[int, ...]:
    """A list of integers (each a Python or NumPy integer, never a float or bool)."""
    items = _as_list(value, what)
    if not all(_is_int(v) and -MAX_INDEX < v < MAX_INDEX for v in items):
        raise InterventionError(
            f"{what} must be a list of integers (|n| < 2**31), got {_show(value)}"
        )
    return tuple(int(v) for v in items)


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (messages stay one short line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python prints
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _closest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass(frozen=True)
class Intervention:
    """Base class. ``heads``: query heads as ``(layer, head)``; ``positions``: query positions
    (negative = from the end), None = all."""

    heads: tuple[Head, ...]
    positions: tuple[int, ...] | None = None

    kind: ClassVar[str] = ""
    acts_on: ClassVar[str] = ""  # "output" (hook_z) or "pattern" (hook_pattern)

    def __post_init__(self) -> None:
        heads = tuple(parse_head(h) for h in _as_list(self.heads, f"{self.kind}: heads"))
        if not heads:
            raise InterventionError(f"{self.kind}: heads must name at least one (layer, head)")
        if len(set(heads)) != len(heads):
            raise InterventionError(f"{self.kind}: a head is listed twice in {_show(heads)}")
        object.__setattr__(self, "heads", heads)
        if self.positions is not None:
            positions = _integers(self.positions, f"{self.kind}: positions")
            if not positions:
                raise InterventionError(
                    f"{self.kind}: positions is empty (the spec would change nothing); leave it "
                    "out to act at every position"
                )
            object.__setattr__(self, "positions", positions)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def heads_in(self, layer: int) -> list[int]:
        return [h for lay, h in self.heads if lay == layer]

    def with_heads(self, heads: Iterable[Head]) -> Intervention:
        """The same intervention on other heads (e.g. a matched random control)."""
        return replace(self, heads=tuple(heads))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "heads": [list(h) for h in self.heads]}
        for f in fields(self):
            if f.name in ("heads",):
                continue
            value = getattr(self, f.name)
            if value is None:  # the default of every optional field
                continue
            out[f.name] = _jsonable(value)
        return out

    def describe(self) -> str:
        heads = ", ".join(f"{layer}.{head}" for layer, head in self.heads)
        defaults = {f.name: f.default for f in fields(self)}
        extra = {
            k: v
            for k, v in self.to_dict().items()
            if k not in ("kind", "heads") and _jsonable(defaults.get(k)) != v
        }
        params = "".join(f" {k}={v}" for k, v in extra.items())
        return f"{self.kind}[{heads}]{params}"


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise InterventionError(f"{name} must be a list, got {_show(value)}")
    return list(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _check_source(kind: str, source: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(source, str) or not source:
        raise InterventionError(f"{kind}: source must name a prompt variant, got {_show(source)}")
    if allowed and source not in allowed:
        raise InterventionError(f"{kind}: source must be one of {allowed}, got {_show(source)}")


@dataclass(frozen=True)
class ZeroAblation(Intervention):
    """The head writes nothing: its output ``z`` (before W_O) is set to 0."""

    kind: ClassVar[str] = "zero"
    acts_on: ClassVar[str] = "output"


@dataclass(frozen=True)
class MeanAblation(Intervention):
    """The head writes its mean output over the task's reference prompts (every token)."""

    kind: ClassVar[str] = "mean"
    acts_on: ClassVar[str] = "output"


@dataclass(frozen=True)
class ResampleAblation(Intervention):
    """The head writes what it wrote on another prompt: the task's ``corrupted`` variant, or
    ``shuffled`` (the next prompt in the same batch, same length)."""

    source: str = "corrupted"
    kind: ClassVar[str] = "resample"
    acts_on: ClassVar[str] = "output"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_source(self.kind, self.source, ())


@dataclass(frozen=True)
class ScaleOutput(Intervention):
    """The head's output is multiplied by ``factor``."""

    factor: float = 0.0
    kind: ClassVar[str] = "scale"
    acts_on: ClassVar[str] = "output"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_number(self.factor):
            raise InterventionError(
                f"scale: factor must be a finite number, got {_show(self.factor)}"
            )
        object.__setattr__(self, "factor", float(self.factor))


@dataclass(frozen=True)
class PatchOutput(Intervention):
    """The head's output is copied from a reference run on the prompt variant ``source``."""

    source: str = "clean"
    kind: ClassVar[str] = "patch_output"
    acts_on: ClassVar[str] = "output"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_source(self.kind, self.source, ())


@dataclass(frozen=True)
class UniformAttention(Intervention):
    """Every query attends uniformly to the keys it may see."""

    kind: ClassVar[str] = "uniform"
    acts_on: ClassVar[str] = "pattern"


@dataclass(frozen=True)
class FirstTokenAttention(Intervention):
    """Every query puts all its attention on key 0."""

    kind: ClassVar[str] = "first_token"
    acts_on: ClassVar[str] = "pattern"


@dataclass(frozen=True)
class Redistribute(Intervention):
    """Scale the attention on sink keys by ``beta``; give the freed mass to other keys.

    Sink keys are ``sinks`` (absolute key positions, negative = from the end) plus, with
    ``threshold``, every key k whose mean received attention ``Σ_i A[i, k] / (N − k)`` exceeds it
    (ACT's hidden-sink rule, 0.1 in their code), computed per prompt and head; ACT leaves the
    first token out of that rule (``exclude_first``). The freed mass ``(1 − beta)·m_S`` goes to
    all non-sink keys in proportion to their attention (ACT), or with ``receivers`` (``[start,
    end)`` key spans; VAR) only to the non-sink keys inside them. A row whose attention is all on
    sinks (or all off the receivers) is left as it is.
    """

    sinks: tuple[int, ...] = ()
    beta: float = 0.4
    threshold: float | None = None
    exclude_first: bool = True
    receivers: tuple[tuple[int, int], ...] | None = None
    kind: ClassVar[str] = "redistribute"
    acts_on: ClassVar[str] = "pattern"

    def __post_init__(self) -> None:
        super().__post_init__()
        sinks = _integers(self.sinks, "redistribute: sinks")
        object.__setattr__(self, "sinks", sinks)
        if not sinks and self.threshold is None:
            raise InterventionError("redistribute: give sink positions (sinks) or a threshold")
        if not _is_number(self.beta) or not 0.0 <= self.beta <= 1.0:
            raise InterventionError(
                f"redistribute: beta must lie in [0, 1], got {_show(self.beta)}"
            )
        object.__setattr__(self, "beta", float(self.beta))
        if self.threshold is not None:
            if not _is_number(self.threshold) or not 0.0 < self.threshold < 1.0:
                raise InterventionError(
                    f"redistribute: threshold must be a number in (0, 1), got "
                    f"{_show(self.threshold)}"
                )
            object.__setattr__(self, "threshold", float(self.threshold))
        if not isinstance(self.exclude_first, bool):
            raise InterventionError(
                f"redistribute: exclude_first must be true or false (a JSON boolean), got "
                f"{_show(self.exclude_first)}"
            )
        if self.receivers is not None:
            spans = []
            for span in _as_list(self.receivers, "redistribute: receivers"):
                pair = _integers(span, "redistribute: a receiver span")
                if len(pair) != 2:
                    raise InterventionError(
                        f"redistribute: receivers are [start, end) pairs, got {_show(span)}"
                    )
                start, end = pair
                if not 0 <= start < end:
                    raise InterventionError(f"redistribute: empty receiver span {_show(span)}")
                spans.append((start, end))
            if not spans:
                raise InterventionError(
                    "redistribute: receivers is empty (no key could receive the mass); leave it "
                    "out to give the mass to every other key"
                )
            object.__setattr__(self, "receivers", tuple(spans))

    def check_keys(self, k_len: int) -> None:
        """Raise :class:`InterventionError` unless every sink position and receiver span lies in
        a prompt of ``k_len`` keys (checked where the spec meets the prompts: a sink beyond the
        prompt would make the spec a silent no-op)."""
        outside = [s for s in self.sinks if not -k_len <= s < k_len]
        if outside:
            raise InterventionError(
                f"redistribute: sink positions {_show(outside)} lie outside a {k_len}-token prompt"
            )
        late = [list(span) for span in self.receivers or () if span[0] >= k_len]
        if late:
            raise InterventionError(
                f"redistribute: receiver spans {_show(late)} start after a {k_len}-token prompt"
            )


@dataclass(frozen=True)
class PatchPattern(Intervention):
    """The head's attention pattern is copied from a reference run on ``source``; it reads the
    values of the target run."""

    source: str = "clean"
    kind: ClassVar[str] = "patch_pattern"
    acts_on: ClassVar[str] = "pattern"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_source(self.kind, self.source, ())


KINDS: dict[str, type[Intervention]] = {
    cls.kind: cls
    for cls in (
        ZeroAblation,
        MeanAblation,
        ResampleAblation,
        ScaleOutput,
        PatchOutput,
        UniformAttention,
        FirstTokenAttention,
        Redistribute,
        PatchPattern,
    )
}


def spec_source(spec: Intervention) -> str | None:
    """Name of the prompt variant whose run ``spec`` reads activations from, if any."""
    return getattr(spec, "source", None)


def spec_from_dict(data: dict[str, Any]) -> Intervention:
    """Build a spec from its JSON form; unknown kinds or keys raise `InterventionError`."""
    if not isinstance(data, dict):
        raise InterventionError(f"a spec is a JSON object, got {_show(data)}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        hint = _closest(kind, KINDS) if isinstance(kind, str) else ""
        raise InterventionError(
            f"unknown intervention kind {_show(kind)}{hint}; kinds: {', '.join(KINDS)}"
        )
    cls = KINDS[kind]
    allowed = {f.name for f in fields(cls)}
    extra = sorted(map(str, set(data) - allowed - {"kind"}))
    if extra:
        raise InterventionError(
            f"{kind}: unknown field(s) {_show(extra)}{_closest(extra[0], allowed)}; allowed: "
            f"{sorted(allowed)}"
        )
    if "heads" not in data:
        raise InterventionError(f"{kind}: missing 'heads'")
    return cls(**{k: v for k, v in data.items() if k != "kind"})


def load_specs(
    source: str | Path | dict | list | tuple | Intervention,
) -> list[Intervention]:
    """Specs from a JSON file path, a JSON string, a dict, a spec, or a list of dicts and specs.

    Raises:
        InterventionError: anything else, a file that cannot be read as UTF-8 JSON (nested at
            most :data:`MAX_DEPTH` deep), an empty list, or a spec that is not valid.
    """
    if isinstance(source, Intervention):
        return [source]
    if isinstance(source, (dict, list, tuple)):
        data: Any = source
    elif isinstance(source, (str, Path)):
        data = _parse_json(_spec_text(source))
    else:
        raise InterventionError(
            f"interventions are a spec, a dict, a list of them, JSON text or a JSON file; got "
            f"{type(source).__name__} {_show(source)}"
        )
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise InterventionError("the spec list is empty")
    return [item if isinstance(item, Intervention) else spec_from_dict(item) for item in items]


MAX_DEPTH = 32  # JSON nesting of a spec file; real specs need 4


def _spec_text(source: str | Path) -> str:
    """Inline JSON as it is, or the UTF-8 text of the file ``source`` names."""
    text = str(source)
    if isinstance(source, str) and text.lstrip().startswith(("{", "[")):
        return text
    path = Path(text)
    if not path.is_file():
        raise InterventionError(f"no such spec file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InterventionError(f"spec file {path} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise InterventionError(f"cannot read spec file {path}: {e.strerror}") from None


def _parse_json(text: str) -> Any:
    depth = max_depth = 0
    in_string = escaped = False
    for char in text:  # before json.loads, whose recursion a deep file would exhaust
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            max_depth = max(max_depth, depth)
        elif char in "]}":
            depth -= 1
    if max_depth > MAX_DEPTH:
        raise InterventionError(f"spec JSON is nested {max_depth} deep; at most {MAX_DEPTH}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InterventionError(f"spec is not valid JSON: {e}") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise InterventionError(f"spec is not valid JSON: {e}") from None


def dump_specs(specs: Sequence[Intervention]) -> str:
    """The JSON form of a list of specs (``load_specs`` reads it back)."""
    return json.dumps([s.to_dict() for s in specs], indent=1)
