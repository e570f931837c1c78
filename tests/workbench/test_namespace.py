"""The package namespaces (``wb.*``, ``interventions.*``, ``app.*``) resolve lazily, to the
objects (never to a submodule that happens to share a name); importing the core does not import
the fronts; the CLI builds its parser without torch."""

import importlib
import pkgutil
import subprocess
import sys
import types

import pytest

import app
import interventions
import workbench as wb


@pytest.mark.parametrize("package", [wb, interventions, app], ids=lambda p: p.__name__)
def test_every_public_name_resolves_to_an_object_not_a_module(package):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)  # submodules become attributes of the package
    for name in package.__all__:
        assert not isinstance(getattr(package, name), types.ModuleType), name
    with pytest.raises(AttributeError, match="no attribute 'scna'"):
        package.scna  # noqa: B018


def test_notebook_names():
    assert callable(wb.atlas) and callable(wb.scan) and callable(wb.evaluate)
    assert wb.evaluate is interventions.evaluate and callable(interventions.self_repair)


def test_core_modules_import_without_the_fronts_or_the_plugins():
    upper = "('probes', 'interventions', 'app', 'workbench.api', 'workbench.cli')"
    code = (
        "import sys, workbench.capture, workbench.store, workbench.headmap;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {upper} or m in {upper}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_cli_parses_and_lists_models_without_torch():
    """``workbench --help`` and ``workbench models`` start at once: the parser modules and the
    built-in model list import no torch, transformers or Dash; a command's handler module loads
    only when it runs."""
    code = (
        "import sys, workbench.cli;"
        "workbench.cli.build_parser().parse_args(['scan', 'toy-bb']);"
        "workbench.cli.main(['models']);"
        "print(sorted(m for m in ('torch', 'transformers', 'dash', 'h5py') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *listing, loaded = out.stdout.strip().splitlines()
    assert "toy-bb" in "".join(listing) and loaded == "[]"
