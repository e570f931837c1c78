"""Generated inputs for the error contract (docs/reliability.md), each with what must happen.

Every generator takes a ``random.Random`` and returns one case whose expected outcome is known by
construction: a valid input (then the result is checked) or a valid input with exactly one
known defect (then a clean error must come). The property tests draw the ``Random`` from
hypothesis (``st.randoms``, derandomized, so a failure reproduces); ``python -m
tests.reliability.fuzz`` draws it from a seed and counts the outcomes.

* :func:`spec_case` -- an intervention spec's JSON form for a model of ``LAYERS x HEADS`` heads
  and prompts of ``SEQ`` tokens;
* :func:`cli_case` -- a ``workbench`` command line with one bad argument (caught by the argument
  types, before anything loads);
* :func:`corruption` -- a damaged copy of a sealed run file (truncated, bytes flipped in its
  metadata or data, overwritten, extended, re-sealed with another kind, or a foreign HDF5 file);
* :func:`prompt_file_case` -- the bytes of a prompt file, valid or not;
* :func:`option_case` -- scan options against the names the probes read.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from typing import Any

# The model the spec cases are made for (toy-ioi: 2 layers x 4 heads) and the prompt length.
LAYERS, HEADS, SEQ = 2, 4, 6
SOURCES = ("corrupted", "clean")  # the prompt variants the spec runner provides, plus shuffled


@dataclass
class Case:
    """One generated input: ``value`` and whether it is ``valid`` (else ``defect`` says what
    is wrong with it, for reports)."""

    value: Any
    valid: bool
    defect: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Intervention specs


def _head_form(rng: random.Random, layer: int, head: int) -> Any:
    """One of the JSON forms of a head (all valid)."""
    return rng.choice(
        [[layer, head], f"{layer}.{head}", f"{layer}-{head}", {"layer": layer, "head": head}]
    )


def _valid_spec(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(
        [
            "zero",
            "mean",
            "resample",
            "scale",
            "patch_output",
            "uniform",
            "first_token",
            "redistribute",
            "patch_pattern",
        ]
    )
    heads = rng.sample([(lay, h) for lay in range(LAYERS) for h in range(HEADS)], rng.randint(1, 3))
    spec: dict[str, Any] = {"kind": kind, "heads": [_head_form(rng, *h) for h in heads]}
    if rng.random() < 0.3:
        spec["positions"] = rng.sample(range(-SEQ, SEQ), rng.randint(1, 3))
    if kind == "scale" and rng.random() < 0.9:
        spec["factor"] = rng.choice([0, 1, 2.5, -1.0, 0.5, 1e-3])
    if kind == "resample" and rng.random() < 0.7:
        spec["source"] = rng.choice(["corrupted", "shuffled"])
    if kind in ("patch_output", "patch_pattern") and rng.random() < 0.7:
        spec["source"] = rng.choice(SOURCES)
    if kind == "redistribute":
        if rng.random() < 0.7:
            spec["sinks"] = rng.sample(range(-SEQ, SEQ), rng.randint(1, 3))
        if "sinks" not in spec or rng.random() < 0.3:
            spec["threshold"] = rng.choice([0.01, 0.1, 0.5, 0.99])
        if rng.random() < 0.7:
            spec["beta"] = rng.choice([0, 0.4, 1, 0.999])
        if rng.random() < 0.3:
            spec["exclude_first"] = rng.choice([True, False])
        if rng.random() < 0.3:
            start = rng.randrange(SEQ)
            spec["receivers"] = [[start, start + rng.randint(1, SEQ)]]
    return spec


def _defects(spec: dict[str, Any], rng: random.Random) -> list[tuple[str, Any]]:
    """``(defect, new spec)`` for every defect that applies to ``spec``."""

    def with_(**changes: Any) -> dict[str, Any]:
        return {**spec, **changes}

    big = 10**5000 if rng.random() < 0.5 else 10**30
    out = [
        ("kind is a list", with_(kind=[spec["kind"]])),
        ("kind is a number", with_(kind=3)),
        ("kind is misspelled", with_(kind=spec["kind"] + "s")),
        ("no kind", {k: v for k, v in spec.items() if k != "kind"}),
        ("no heads", {k: v for k, v in spec.items() if k != "heads"}),
        ("heads empty", with_(heads=[])),
        ("heads not a list", with_(heads="0.0")),
        ("head of floats", with_(heads=[[0.9, 1.9]])),
        ("head of integral floats", with_(heads=[[1.0, 0.0]])),
        ("head of bools", with_(heads=[[True, False]])),
        ("head with infinity", with_(heads=[[float("inf"), 0]])),
        ("head with NaN", with_(heads=[[float("nan"), 0]])),
        ("negative head", with_(heads=[[0, -1]])),
        ("layer out of range", with_(heads=[[LAYERS, 0]])),
        ("head out of range", with_(heads=[[0, HEADS]])),
        ("huge head index", with_(heads=[[big, 0]])),
        ("head of three", with_(heads=[[0, 1, 2]])),
        ("head string", with_(heads=["zero.one"])),
        ("head dict with extra key", with_(heads=[{"layer": 0, "head": 0, "x": 1}])),
        ("head listed twice", with_(heads=[[0, 1], "0.1"])),
        ("nested head", with_(heads=[[[0, 1]]])),
        ("unknown field", with_(betta=0.4)),
        ("positions of floats", with_(positions=[0.5])),
        ("positions of bools", with_(positions=[True])),
        ("positions empty", with_(positions=[])),
        ("position beyond the prompt", with_(positions=[SEQ + 3])),
        ("positions a string", with_(positions="1")),
    ]
    kind = spec["kind"]
    if kind == "scale":
        out += [
            ("factor NaN", with_(factor=float("nan"))),
            ("factor infinite", with_(factor=float("-inf"))),
            ("factor a string", with_(factor="2")),
            ("factor a bool", with_(factor=True)),
        ]
    if kind in ("resample", "patch_output", "patch_pattern"):
        out += [
            ("source empty", with_(source="")),
            ("source a number", with_(source=5)),
            ("source not provided", with_(source="elsewhere")),
        ]
    if kind == "redistribute":
        base = with_(sinks=[0])
        out += [
            ("beta above 1", {**base, "beta": 1.5}),
            ("beta negative", {**base, "beta": -0.1}),
            ("beta NaN", {**base, "beta": float("nan")}),
            ("beta a string", {**base, "beta": "0.3"}),
            ("beta a bool", {**base, "beta": True}),
            ("threshold 0", with_(threshold=0)),
            ("threshold 1", with_(threshold=1)),
            ("threshold a string", with_(threshold="abc")),
            ("threshold a bool", with_(threshold=True)),
            ("threshold NaN", with_(threshold=float("nan"))),
            ("exclude_first a string", {**base, "exclude_first": "false"}),
            ("exclude_first a number", {**base, "exclude_first": 0}),
            ("exclude_first null", {**base, "exclude_first": None}),
            ("sink beyond the prompt", {**base, "sinks": [999]}),
            ("sink before the prompt", {**base, "sinks": [-SEQ - 1]}),
            ("sinks of floats", {**base, "sinks": [0.5]}),
            ("sinks of bools", {**base, "sinks": [True]}),
            ("sinks a string", {**base, "sinks": "0"}),
            (
                "no sinks and no threshold",
                {k: v for k, v in base.items() if k != "threshold"} | {"sinks": []},
            ),
            ("empty receiver span", {**base, "receivers": [[3, 3]]}),
            ("receiver span of one", {**base, "receivers": [[3]]}),
            ("receiver span of floats", {**base, "receivers": [[1.5, 3]]}),
            ("receivers empty", {**base, "receivers": []}),
            ("receivers after the prompt", {**base, "receivers": [[SEQ + 2, SEQ + 5]]}),
        ]
    return out


def spec_case(rng: random.Random) -> Case:
    """A spec's JSON form: valid (2 in 5), or a valid one with one defect."""
    spec = _valid_spec(rng)
    if rng.random() < 0.4:
        return Case(spec, True)
    defect, value = rng.choice(_defects(spec, rng))
    return Case(value, False, defect)


def raw_spec_text_case(rng: random.Random) -> Case:
    """Spec JSON text that cannot be a spec: nested deeply, with a 5000-digit integer, not
    UTF-8, not JSON, or an empty list."""
    defect = rng.choice(["deep", "digits", "bytes", "garbage", "empty list", "scalar"])
    if defect == "deep":
        depth = rng.choice([100, 5000, 50_000])
        text: str | bytes = "[" * depth + "]" * depth
    elif defect == "digits":
        text = '{"kind": "zero", "heads": [[' + "7" * rng.choice([5000, 20_000]) + ", 0]]}"
    elif defect == "bytes":
        text = bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 64)))
    elif defect == "garbage":
        text = "{" + "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40)))
    elif defect == "empty list":
        text = "[]"
    else:
        text = json.dumps(rng.choice([1, "zero", None, True, 2.5]))
    return Case(text, False, f"spec text: {defect}")


# ---------------------------------------------------------------------------------------------
# Command lines


def _bad_integer(rng: random.Random, low: int, high: int | None) -> str:
    options = [
        str(low - 1),
        str(low - rng.randint(2, 10**6)),
        "1.5",
        "1e3",
        "abc",
        "",
        " ",
        "9" * 5000,
        "nan",
        "0x10",
        "½",
    ]
    if high is not None:
        options.append(str(high + rng.randint(1, 1000)))
    return rng.choice(options)


def _bad_real(rng: random.Random, low: float | None, high: float | None) -> str:
    options = ["nan", "NaN", "inf", "-inf", "abc", "", "1,5", "1e999"]
    if low is not None:
        options.append(str(low - rng.choice([0.5, 1, 100])))
    if high is not None:
        options.append(str(high + rng.choice([0.5, 1, 100])))
    return rng.choice(options)


def _bad_list(rng: random.Random, kind: str) -> str:
    return rng.choice(
        ["", ",", " , ", "a,b", "1,nan", "1;2", "1,,x"]
        + (["1.5,2", "-1"] if kind == "int+" else ["2,3", "-0.5"])
    )


# Typed arguments of each command: flag -> (kind, low, high). Values are made bad per kind.
ARGUMENTS: dict[str, dict[str, tuple]] = {
    "models": {},
    "scan": {
        "--max-tokens": ("int", 1, None),
        "--batch-size": ("int", 1, None),
        "--probes": ("names",),
        "--device": ("device",),
        "--out": ("file",),
        "--path": ("choice",),
        "--dtype": ("choice",),
        "--option": ("kv",),
        "--device-map": ("devmap",),
    },
    "show": {"--scores": ("names",)},
    "export": {
        "--out": ("dir",),
        "--threshold": ("real", None, None),
        "--full-fraction": ("real", 0, 1),
        "--sink-size": ("int", 0, None),
        "--recent-size": ("int", 1, None),
        "--format": ("choice",),
        "--gqa": ("choice",),
        "--heads": ("heads",),
    },
    "evaluate-map": {
        "--full-fractions": ("list", "fraction"),
        "--lengths": ("list", "int+"),
        "--depths": ("list", "fraction"),
        "--needles": ("int", 1, None),
        "--needle": ("int", 0, None),
        "--trials": ("int", 1, None),
        "--sink-size": ("int", 0, None),
        "--recent-size": ("int", 1, None),
        "--max-new": ("int", 1, None),
        "--seed": ("int", 0, 2**32 - 1),
        "--device": ("device",),
        "--out": ("file",),
        "--task": ("choice",),
    },
    "cache": {
        "--out": ("file",),
        "--max-tokens": ("int", 1, None),
        "--device": ("device",),
    },
    "train-toy": {
        "--out": ("dir",),
        "--seed": ("int", 0, 2**32 - 1),
        "--steps": ("int", 1, None),
        "--device": ("device",),
    },
    "app": {"--port": ("int", 1, 65535), "--device": ("device",)},
    "intervene": {
        "--top-k": ("int", 1, None),
        "--controls": ("int", 0, None),
        "--seed": ("int", 0, 2**32 - 1),
        "--batch-size": ("int", 1, None),
        "--out": ("file",),
        "--device": ("device",),
        "--task": ("choice",),
        "--path": ("choice",),
        "--task-option": ("kv",),
    },
    "ioi": {
        "--n": ("int", 1, None),
        "--seed": ("int", 0, 2**32 - 1),
        "--templates": ("list", "int+"),
        "--exact-heads": ("int", 0, None),
        "--max-senders": ("int", 1, None),
        "--out": ("file",),
        "--run": ("file",),
        "--plot": ("file",),
        "--device": ("device",),
        "--rule": ("kv",),
    },
}

# What each command needs besides the bad argument (placeholders filled by :func:`cli_case`).
REQUIRED = {
    "models": [],
    "scan": ["MODEL"],
    "show": ["RUN"],
    "export": ["RUN", "--format", "json", "--out", "OUTDIR"],
    "evaluate-map": ["RUN"],
    "cache": [
        "MODEL",
        "--prompts",
        "PROMPTS",
        "--hooks",
        "blocks.*.attn.hook_z",
        "--out",
        "OUTFILE",
    ],
    "train-toy": ["toy-bb"],
    "app": [],
    "intervene": ["MODEL", "--task", "toy", "--spec", "SPEC"],
    "ioi": ["MODEL"],
}


def _bad_value(rng: random.Random, spec: tuple) -> str:
    kind = spec[0]
    if kind == "int":
        return _bad_integer(rng, spec[1], spec[2])
    if kind == "real":
        return _bad_real(rng, spec[1], spec[2])
    if kind == "list":
        return _bad_list(rng, spec[1])
    if kind == "names":
        return rng.choice(["", ",", " , ", "a,,b", ",sink"])
    if kind == "device":
        return rng.choice(["nosuch", "cuda:x", "gpu", "", "cpu:", "CUDA", "cuda:1:2"])
    if kind == "file":
        return rng.choice(["DIR", "FILE/x.h5", "/proc/x.h5", "FILE/a/b.json", ""])
    if kind == "dir":
        return rng.choice(["FILE", "FILE/sub", "/proc/sub", ""])
    if kind == "choice":
        return rng.choice(["nosuch", "", "JSON", "auto "])
    if kind == "kv":
        return rng.choice(["noequals", "=1", "k=" + "9" * 5000, " =x"])
    if kind == "heads":
        return rng.choice(["1,2", "a,b,c", "1,2,3,4", "-1,2,3", ""])
    if kind == "devmap":
        return rng.choice(["{", "nosuch", '{"a": [1]}', "[1]", '{"a": true}'])
    raise ValueError(kind)


def cli_case(rng: random.Random) -> Case:
    """``workbench`` arguments with one bad value (or an unknown flag, or a required argument
    missing), with placeholders ``MODEL``, ``RUN``, ``DIR``, ``FILE``, ``OUTDIR``, ``OUTFILE``,
    ``PROMPTS``, ``SPEC`` for the runner to fill. Every such line must exit with code 2 and one
    stderr line, and leave nothing behind."""
    command = rng.choice(sorted(ARGUMENTS))
    argv = [command, *REQUIRED[command]]
    roll = rng.random()
    if roll < 0.08 or not ARGUMENTS[command]:
        argv.append("--no-such-flag")
        defect = "unknown flag"
    elif roll < 0.12 and command in ("export", "cache", "intervene"):
        argv = [command] + (["RUN"] if command == "export" else ["MODEL"])
        defect = "required argument missing"
    else:
        flag = rng.choice(sorted(ARGUMENTS[command]))
        value = _bad_value(rng, ARGUMENTS[command][flag])
        if flag in argv:  # replace the required argument's value
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        defect = f"{flag} {value[:20]!r}"
    return Case(argv, False, defect)


# ---------------------------------------------------------------------------------------------
# Run-file corruptions


def corruption(rng: random.Random, good: bytes, other: bytes) -> Case:
    """A damaged copy of the sealed run file ``good`` (``other``: another sealed run file); the
    unchanged file now and then (valid, as a control)."""
    data = bytearray(good)
    seal = 512  # workbench.store.SEAL_SIZE
    kind = rng.choice(
        [
            "truncate",
            "flip metadata",
            "flip data",
            "flip anywhere",
            "flip seal",
            "overwrite",
            "zero span",
            "append",
            "swap seal",
            "foreign",
            "unchanged",
        ]
    )
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind.startswith("flip"):
        lo, hi = {
            "flip metadata": (seal, min(len(data), seal + 4096)),
            "flip data": (len(data) // 2, len(data)),
            "flip seal": (0, seal),
            "flip anywhere": (0, len(data)),
        }[kind]
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    elif kind in ("overwrite", "zero span"):
        start = rng.randrange(len(data))
        length = rng.randint(1, 256)
        fill = (
            bytes(rng.randrange(256) for _ in range(length))
            if kind == "overwrite"
            else b"\0" * length
        )
        data[start : start + length] = fill[: len(data) - start]
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "swap seal":
        data = bytearray(other[:seal]) + data[seal:]
        if other[seal:] == good[seal:]:
            return Case(bytes(data), True, "", {"kind": kind})
    elif kind == "foreign":
        return Case(
            None,
            False,
            "foreign HDF5",
            {"kind": kind, "seed": rng.randrange(2**31), "with_seal": rng.random() < 0.5},
        )
    valid = bytes(data) == good
    return Case(bytes(data), valid, "" if valid else kind, {"kind": kind})


# ---------------------------------------------------------------------------------------------
# Prompt files and options


def prompt_file_case(rng: random.Random) -> Case:
    """A ``.jsonl`` or ``.txt`` prompt file's bytes; valid ones carry their texts in ``extra``."""
    suffix = rng.choice([".jsonl", ".txt"])
    texts = [
        "".join(rng.choice(string.ascii_letters + " é✓") for _ in range(rng.randint(1, 30))).strip()
        or "x"
        for _ in range(rng.randint(1, 4))
    ]
    if suffix == ".jsonl":
        good = "\n".join(json.dumps({"text": t}) for t in texts) + "\n"
    else:
        good = "\n\n".join(texts) + "\n"
    defect = rng.choice(
        ["", "", "latin-1", "random bytes", "bad json", "no text", "empty", "deep", "digits"]
    )
    if not defect or (suffix == ".txt" and defect in ("bad json", "no text", "deep", "digits")):
        return Case(good.encode(), True, "", {"suffix": suffix, "texts": texts})
    data = {
        "latin-1": "café\n".encode("latin-1") + good.encode(),
        "random bytes": bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 100))),
        "bad json": (good + "{not json\n").encode(),
        "no text": (good + json.dumps({"txt": "a"}) + "\n").encode(),
        "empty": b"\n\n" if rng.random() < 0.5 else b"",
        "deep": ("[" * 50_000 + "]" * 50_000 + "\n").encode(),
        "digits": ('{"text": "a", "n": ' + "9" * 5000 + "}\n").encode(),
    }[defect]
    return Case(data, False, defect, {"suffix": suffix})


OPTION_NAMES = ("retrieval_lengths", "retrieval_depths", "positional_prompts", "dormant_tokens")


def option_case(rng: random.Random) -> Case:
    """Scan options (names and values) for probes that read ``OPTION_NAMES``: valid when every
    key is one of them; a misspelled or foreign key must be refused."""
    keys = rng.sample(OPTION_NAMES, rng.randint(0, 2))
    if rng.random() < 0.6:
        wrong = rng.choice(OPTION_NAMES)
        i = rng.randrange(len(wrong))
        keys.append(rng.choice([wrong[:i] + wrong[i + 1 :], wrong + "s", wrong.upper(), "x"]))
    options = {k: rng.randint(1, 4) for k in keys}
    valid = all(k in OPTION_NAMES for k in options)
    return Case(options, valid, "" if valid else "unknown option")
