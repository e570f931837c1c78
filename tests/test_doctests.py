"""The runnable examples in docstrings (cheap ones run; model-loading ones are marked SKIP)."""

import doctest
import importlib

import pytest

MODULES = [
    "benchmarks.smollm2_long",
    "interventions.specs",
    "interventions.evaluation",
    "probes.retrieval",
    "workbench.scanner",
    "workbench.scores",
    "workbench.tasks.registry",
    "workbench.tasks.templated",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if name in ("interventions.specs", "workbench.tasks.registry"):
        assert result.attempted >= 3
