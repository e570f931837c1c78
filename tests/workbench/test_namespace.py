"""The ``wb.*`` notebook namespace resolves lazily, to the objects (never to a submodule that
happens to share a name), and importing the core does not import the fronts."""

import importlib
import pkgutil
import subprocess
import sys
import types

import pytest

import workbench as wb


def test_every_public_name_resolves_to_an_object_not_a_module():
    for info in pkgutil.walk_packages(wb.__path__, "workbench."):
        if info.name != "workbench.__main__":
            importlib.import_module(info.name)  # submodules become attributes of the package
    for name in wb.__all__:
        assert not isinstance(getattr(wb, name), types.ModuleType), name
    assert callable(wb.atlas) and callable(wb.scan) and callable(wb.evaluate)
    with pytest.raises(AttributeError, match="no attribute 'scna'"):
        wb.scna  # noqa: B018


def test_core_modules_import_without_the_fronts_or_the_plugins():
    upper = "('probes', 'interventions', 'app', 'workbench.api', 'workbench.cli')"
    code = (
        "import sys, workbench.capture, workbench.store, workbench.headmap;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {upper} or m in {upper}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
