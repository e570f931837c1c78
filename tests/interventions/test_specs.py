import json

import pytest

from interventions.specs import (
    KINDS,
    Redistribute,
    ZeroAblation,
    dump_specs,
    load_specs,
    parse_head,
    spec_from_dict,
)
from workbench.errors import InterventionError

EXAMPLES = [
    {"kind": "zero", "heads": [[1, 2]]},
    {"kind": "mean", "heads": [[0, 1], [1, 3]], "positions": [-1]},
    {"kind": "resample", "heads": [[0, 0]], "source": "shuffled"},
    {"kind": "scale", "heads": [[1, 1]], "factor": 2.5},
    {"kind": "patch_output", "heads": [[1, 0]], "source": "corrupted"},
    {"kind": "uniform", "heads": [[0, 3]]},
    {"kind": "first_token", "heads": [[1, 2]]},
    {"kind": "redistribute", "heads": [[0, 1]], "sinks": [0, 1], "beta": 0.3},
    {"kind": "redistribute", "heads": [[0, 2]], "threshold": 0.1, "receivers": [[4, 8]]},
    {"kind": "patch_pattern", "heads": [[1, 3]], "source": "clean"},
]


def test_every_kind_has_an_example():
    assert {e["kind"] for e in EXAMPLES} == set(KINDS)


@pytest.mark.parametrize("data", EXAMPLES, ids=[e["kind"] for e in EXAMPLES])
def test_json_round_trip(data):
    spec = spec_from_dict(data)
    assert type(spec) is KINDS[data["kind"]]
    again = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    for key, value in data.items():
        assert spec.to_dict()[key] == value


def test_list_round_trip_through_file(tmp_path):
    specs = [spec_from_dict(e) for e in EXAMPLES]
    path = tmp_path / "spec.json"
    path.write_text(dump_specs(specs))
    assert load_specs(path) == specs
    assert load_specs(str(path)) == specs
    assert load_specs(json.dumps(EXAMPLES[0])) == [specs[0]]


@pytest.mark.parametrize("value", [[3, 4], (3, 4), "3.4", "3-4", {"layer": 3, "head": 4}])
def test_head_forms(value):
    assert parse_head(value) == (3, 4)


def test_with_heads_keeps_parameters():
    spec = Redistribute(heads=[(0, 1)], sinks=[0], beta=0.2)
    moved = spec.with_heads([(0, 3)])
    assert moved.heads == ((0, 3),) and moved.beta == 0.2 and moved.sinks == (0,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "erase", "heads": [[0, 0]]}, "unknown intervention kind"),
        ({"kind": "zero", "heads": [[0, 0]], "beta": 1}, "unknown field"),
        ({"kind": "zero"}, "missing 'heads'"),
        ({"kind": "zero", "heads": []}, "at least one"),
        ({"kind": "zero", "heads": [[0, 0], "0.0"]}, "listed twice"),
        ({"kind": "zero", "heads": [[0, -1]]}, ">= 0"),
        ({"kind": "zero", "heads": ["x"]}, "a head is"),
        ({"kind": "scale", "heads": [[0, 0]], "factor": "big"}, "finite number"),
        ({"kind": "redistribute", "heads": [[0, 0]]}, "sinks"),
        ({"kind": "redistribute", "heads": [[0, 0]], "sinks": [0], "beta": 1.5}, "beta"),
        ({"kind": "redistribute", "heads": [[0, 0]], "threshold": 2}, "threshold"),
        ({"kind": "redistribute", "heads": [[0, 0]], "sinks": [0], "receivers": [[5, 5]]}, "span"),
    ],
)
def test_bad_specs_raise(data, message):
    with pytest.raises(InterventionError, match=message):
        spec_from_dict(data)


def test_load_errors(tmp_path):
    with pytest.raises(InterventionError, match="no such spec file"):
        load_specs(tmp_path / "missing.json")
    with pytest.raises(InterventionError, match="not valid JSON"):
        load_specs("{oops")
    with pytest.raises(InterventionError, match="empty"):
        load_specs([])


def test_describe():
    assert ZeroAblation(heads=[(9, 9)], positions=[-1]).describe() == "zero[9.9] positions=[-1]"
