import pytest

from probes import PROBES, get_probes
from workbench.errors import WorkbenchError


def test_registry_names_every_probe():
    expected = {"sink", "entropy", "hidden_sink", "value_drain", "residual_peak", "dormant",
                "positional", "streaming"}  # fmt: skip
    assert expected <= set(PROBES)
    assert [p.name for p in get_probes("positional,sink")] == ["positional", "sink"]
    with pytest.raises(WorkbenchError, match="unknown probe"):
        get_probes("nonsense")
