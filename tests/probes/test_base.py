import pytest

from probes import PROBES, get_probes
from probes.base import ScanContext
from probes.basic import choose_path
from workbench.capture import PATTERN_PATH_MAX_TOKENS
from workbench.errors import ProbeOptionError, WorkbenchError
from workbench.tasks import PromptSet


def test_option_converts_to_the_default_type(tiny_model):
    ctx = ScanContext(
        tiny_model,
        PromptSet("p", ("a",)),
        options={"n": "12", "flag": "true", "domains": "prose,code", "single": "code", "x": 2},
    )
    assert ctx.option("n", 4) == 12
    assert ctx.option("flag", False) is True
    assert ctx.option("domains", ("prose",)) == ("prose", "code")
    assert ctx.option("single", ("prose",)) == ("code",)
    assert ctx.option("x", 0.5) == 2.0
    assert ctx.option("missing", 7) == 7
    with pytest.raises(ProbeOptionError, match="option n='12'"):
        ctx.option("n", False)
    with pytest.raises(ProbeOptionError, match="expected int"):
        ScanContext(tiny_model, PromptSet("p", ("a",)), options={"n": "many"}).option("n", 4)


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
