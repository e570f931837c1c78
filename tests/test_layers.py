"""The layers contract: every project import points down or sideways, at module level.

Layers, lowest first (docs/architecture.md explains each):

1. ``kernels`` -- Triton kernels and their torch references;
2. ``core`` -- every ``workbench`` module that is not a front: models and placement, capture,
   the run store, head maps, export, tasks, toys, figures, the probe API;
3. ``plugins`` -- ``probes`` and ``interventions``, which never import each other;
4. ``fronts`` -- the scanner, the notebook API, the CLI, the explorer (``app``) and the
   benchmark scripts.

A module may import from its own layer or a lower one, and only at module level: an import
inside a function or under ``TYPE_CHECKING`` hides an edge from readers and from this test. A
command's handler, named ``"package.module:function"`` so that the CLI imports it only when the
command runs, counts as an import by the module that names it.
``python tests/test_layers.py --write`` refreshes the import graph that docs/architecture.md
shows (a test fails while it is stale).
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from workbench.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "workbench", "probes", "interventions", "app", "benchmarks")
LAYERS = ("kernels", "core", "plugins", "fronts")
# Modules of the workbench package (and the one kernels script) that are fronts, not core.
FRONTS = (
    "workbench",  # the package itself: wb.* for notebooks
    "workbench.__main__",
    "workbench.api",
    "workbench.cli",
    "workbench.commands",
    "workbench.distributed",
    "workbench.scanner",
    "kernels.bench",
)


HANDLER = re.compile(r"((?:kernels|workbench|probes|interventions|app)(?:\.\w+)+):\w+")


def layer_of(module: str) -> str:
    """The layer of a dotted module name of this project."""
    top = module.split(".")[0]
    if module in FRONTS or top in ("app", "benchmarks"):
        return "fronts"
    if top in ("probes", "interventions"):
        return "plugins"
    return "kernels" if top == "kernels" else "core"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (as written)
    line: int
    nested: bool  # inside a function or an ``if TYPE_CHECKING:`` block

    def __str__(self) -> str:
        where = "inside a function / TYPE_CHECKING" if self.nested else "module level"
        return f"{self.source}:{self.line} imports {self.target} ({where})"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _nested_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside functions or ``if TYPE_CHECKING:`` blocks."""
    nested: set[int] = set()
    for node in ast.walk(tree):
        inside = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            inside = name == "TYPE_CHECKING"
        if inside:
            nested.update(
                id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)
            )
    return nested


def import_edges(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Edge]:
    """Every import of a project module by a project module under ``root``."""
    edges = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            source = module_name(root, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            nested = _nested_nodes(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    match = HANDLER.fullmatch(node.value)  # a command's handler
                    if match:
                        edges.append(Edge(source, match.group(1), node.lineno, False))
                    continue
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # ``from package import submodule`` imports the submodule, not the package
                    base = root.joinpath(*node.module.split("."))
                    targets = [
                        f"{node.module}.{alias.name}"
                        if (base / f"{alias.name}.py").exists() or (base / alias.name).is_dir()
                        else node.module
                        for alias in node.names
                    ]
                else:
                    continue
                edges.extend(
                    Edge(source, target, node.lineno, id(node) in nested)
                    for target in sorted(set(targets))
                    if target.split(".")[0] in packages
                )
    return edges


def violations(edges: list[Edge]) -> list[str]:
    """What breaks the contract: upward edges, plugin-to-plugin edges, nested imports."""
    found = []
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if edge.nested:
            found.append(f"{edge}: project imports belong at module level")
        if LAYERS.index(target) > LAYERS.index(source):
            found.append(f"{edge}: {source} may not import from {target}")
        top_source, top_target = edge.source.split(".")[0], edge.target.split(".")[0]
        if source == target == "plugins" and top_source != top_target:
            found.append(f"{edge}: probes and interventions are independent plugins")
    return found


def test_the_project_keeps_its_layers():
    assert violations(import_edges(ROOT)) == []


def test_every_module_is_parsed():
    modules = {edge.source for edge in import_edges(ROOT)}
    assert {"workbench.capture.attention", "probes.sinks", "interventions.engine"} <= modules
    assert {"workbench.cli", "app.server", "kernels.attention_stats"} <= modules


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"kernels/k.py": "from workbench.models import Model\n"}, "kernels may not import"),
        ({"workbench/models.py": "import probes.sinks\n"}, "core may not import from plugins"),
        ({"workbench/store.py": "from workbench.scanner import scan\n"}, "core may not import"),
        ({"probes/p.py": "from interventions import ops\n"}, "independent plugins"),
        ({"probes/p.py": "from app import serve\n"}, "plugins may not import from fronts"),
        ({"interventions/cli.py": "H = 'app.server:run_app'\n"}, "plugins may not import"),
        (
            {"workbench/models.py": "def f():\n    import workbench.store\n"},
            "belong at module level",
        ),
        (
            {"app/x.py": "import typing\nif typing.TYPE_CHECKING:\n    import probes\n"},
            "belong at module level",
        ),
    ],
)
def test_a_deliberate_back_edge_is_caught(tmp_path, files, message):
    edges = import_edges(_tree(tmp_path, files))
    found = violations(edges)
    assert len(found) == 1 and message in found[0]


def test_downward_and_sideways_edges_pass(tmp_path):
    files = {
        "workbench/cli.py": "import probes\nimport interventions.engine\nimport workbench.api\n",
        "probes/p.py": "from workbench.capture import resolve_path\nimport kernels\n",
        "workbench/models.py": "from workbench.placement import place\nfrom kernels import x\n",
    }
    assert violations(import_edges(_tree(tmp_path, files))) == []


def package_graph(edges: list[Edge]) -> list[tuple[str, str]]:
    """Sorted ``(source, target)`` edges between the units docs/architecture.md draws: each
    package, with workbench split into its core modules and its fronts."""

    def unit(module: str) -> str:
        top = module.split(".")[0]
        if top != "workbench":
            return top
        if module in FRONTS:
            return module
        return "workbench." + module.split(".")[1] if "." in module else module

    return sorted({(unit(e.source), unit(e.target)) for e in edges})


MARKERS = ("<!-- import-graph:start -->", "<!-- import-graph:end -->")
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"


# Imported from everywhere; drawn, they would hide the structure.
UTILITIES = ("workbench.errors", "workbench.atomic", "workbench.lazy", "workbench.arguments")


def mermaid(edges: list[Edge]) -> str:
    """The unit graph of :func:`package_graph` as a mermaid flowchart (arrows point down),
    without the edges into :data:`UTILITIES`."""
    lines = ["```mermaid", "flowchart BT"]
    for source, target in package_graph(edges):
        if source != target and target not in UTILITIES:
            lines.append(f"    {source.replace('.', '_')}[{source}] --> {target.replace('.', '_')}")
    return "\n".join([*lines, "```"])


def with_graph(document: str, graph: str) -> str:
    start, end = MARKERS
    head, _, rest = document.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{graph}\n{end}{tail}"


def test_architecture_doc_shows_the_current_graph():
    document = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    assert document == with_graph(document, mermaid(import_edges(ROOT))), (
        "docs/architecture.md's import graph is stale: run python tests/test_layers.py --write"
    )


if __name__ == "__main__":
    graph = mermaid(import_edges(ROOT))
    if sys.argv[1:] == ["--write"]:
        document = ARCHITECTURE_DOC.read_text(encoding="utf-8")
        atomic_write_text(ARCHITECTURE_DOC, with_graph(document, graph))
    else:
        print(graph)
