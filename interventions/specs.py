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

>>> spec = spec_from_dict({"kind": "scale", "heads": ["9.9", [10, 0]], "factor": 2.0})
>>> spec.heads
((9, 9), (10, 0))
>>> load_specs(dump_specs([spec])) == [spec]
True
"""

from __future__ import annotations

import json
import math
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


def parse_head(value: Any) -> Head:
    """``[l, h]``, ``(l, h)``, ``"l.h"``, ``"l-h"`` or ``{"layer": l, "head": h}`` → ``(l, h)``."""
    if isinstance(value, dict) and set(value) >= {"layer", "head"}:
        pair = [value["layer"], value["head"]]
    elif isinstance(value, str):
        pair = value.replace("-", ".").split(".")
    elif isinstance(value, Sequence):
        pair = list(value)
    else:
        pair = []
    try:
        layer, head = (int(p) for p in pair)
    except (TypeError, ValueError):
        raise InterventionError(
            f"a head is [layer, head], 'layer.head' or {{'layer': l, 'head': h}}; got {value!r}"
        ) from None
    if layer < 0 or head < 0:
        raise InterventionError(f"layer and head must be >= 0, got {value!r}")
    return layer, head


@dataclass(frozen=True)
class Intervention:
    """Base class. ``heads``: query heads as ``(layer, head)``; ``positions``: query positions
    (negative = from the end), None = all."""

    heads: tuple[Head, ...]
    positions: tuple[int, ...] | None = None

    kind: ClassVar[str] = ""
    acts_on: ClassVar[str] = ""  # "output" (hook_z) or "pattern" (hook_pattern)

    def __post_init__(self) -> None:
        heads = tuple(parse_head(h) for h in _as_list(self.heads, "heads"))
        if not heads:
            raise InterventionError(f"{self.kind}: heads must name at least one (layer, head)")
        if len(set(heads)) != len(heads):
            raise InterventionError(f"{self.kind}: a head is listed twice in {heads}")
        object.__setattr__(self, "heads", heads)
        if self.positions is not None:
            try:
                positions = tuple(int(p) for p in _as_list(self.positions, "positions"))
            except (TypeError, ValueError):
                raise InterventionError(
                    f"{self.kind}: positions must be integers, got {self.positions!r}"
                ) from None
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
    if isinstance(value, (str, dict)) or not isinstance(value, Iterable):
        raise InterventionError(f"{name} must be a list, got {value!r}")
    return list(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _check_source(kind: str, source: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(source, str) or not source:
        raise InterventionError(f"{kind}: source must name a prompt variant, got {source!r}")
    if allowed and source not in allowed:
        raise InterventionError(f"{kind}: source must be one of {allowed}, got {source!r}")


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
        if not isinstance(self.factor, (int, float)) or not math.isfinite(self.factor):
            raise InterventionError(f"scale: factor must be a finite number, got {self.factor!r}")
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
        try:
            sinks = tuple(int(s) for s in _as_list(self.sinks, "sinks"))
        except (TypeError, ValueError):
            raise InterventionError(
                f"redistribute: sinks must be integers, got {self.sinks!r}"
            ) from None
        object.__setattr__(self, "sinks", sinks)
        if not sinks and self.threshold is None:
            raise InterventionError("redistribute: give sink positions (sinks) or a threshold")
        if not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise InterventionError(f"redistribute: beta must lie in [0, 1], got {self.beta!r}")
        object.__setattr__(self, "beta", float(self.beta))
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise InterventionError(
                f"redistribute: threshold must lie in (0, 1), got {self.threshold!r}"
            )
        if self.receivers is not None:
            spans = []
            for span in _as_list(self.receivers, "receivers"):
                try:
                    start, end = (int(x) for x in span)
                except (TypeError, ValueError):
                    raise InterventionError(
                        f"redistribute: receivers are [start, end) pairs, got {span!r}"
                    ) from None
                if not 0 <= start < end:
                    raise InterventionError(f"redistribute: empty receiver span {span!r}")
                spans.append((start, end))
            object.__setattr__(self, "receivers", tuple(spans))


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
        raise InterventionError(f"a spec is a JSON object, got {data!r}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise InterventionError(f"unknown intervention kind {kind!r}; kinds: {', '.join(KINDS)}")
    cls = KINDS[kind]
    allowed = {f.name for f in fields(cls)}
    extra = set(data) - allowed - {"kind"}
    if extra:
        raise InterventionError(
            f"{kind}: unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}"
        )
    if "heads" not in data:
        raise InterventionError(f"{kind}: missing 'heads'")
    return cls(**{k: v for k, v in data.items() if k != "kind"})


def load_specs(source: str | Path | dict | list) -> list[Intervention]:
    """Specs from a JSON file path, a JSON string, a dict or a list of dicts."""
    if isinstance(source, (dict, list)):
        data: Any = source
    else:
        text = str(source)
        if not text.lstrip().startswith(("{", "[")):
            path = Path(text)
            if not path.is_file():
                raise InterventionError(f"no such spec file: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InterventionError(f"spec is not valid JSON: {e}") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise InterventionError("the spec list is empty")
    return [spec_from_dict(item) for item in items]


def dump_specs(specs: Sequence[Intervention]) -> str:
    """The JSON form of a list of specs (``load_specs`` reads it back)."""
    return json.dumps([s.to_dict() for s in specs], indent=1)
