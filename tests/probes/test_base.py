import pytest

from probes import PROBES, get_probes
from probes.basic import choose_path
from workbench.capture import PATTERN_PATH_MAX_TOKENS
from workbench.errors import WorkbenchError


def test_choose_path_by_length():
    assert choose_path("auto", PATTERN_PATH_MAX_TOKENS) == "pattern"
    assert choose_path("auto", PATTERN_PATH_MAX_TOKENS + 1) == "streamed"
    assert choose_path("streamed", 10) == "streamed"
    with pytest.raises(ValueError, match="path must be one of"):
        choose_path("fast", 10)


def test_registry_names_every_probe():
    expected = {"sink", "entropy", "hidden_sink", "value_drain", "residual_peak", "dormant",
                "positional", "streaming"}  # fmt: skip
    assert expected <= set(PROBES)
    assert [p.name for p in get_probes("positional,sink")] == ["positional", "sink"]
    with pytest.raises(WorkbenchError, match="unknown probe"):
        get_probes("nonsense")
