"""Page helpers: typed head lists."""

from __future__ import annotations

import pytest

from app.components import parse_heads
from workbench.models import ModelInfo


def test_parse_heads() -> None:
    info = ModelInfo("m", "local", "r", "LlamaForCausalLM", 4, 8, 2, 64, 2048, True, 4096, "0")
    assert parse_heads("3.2, L1H0; 2:7, 3.2", info) == [(3, 2), (1, 0), (2, 7)]
    with pytest.raises(ValueError, match="outside the model"):
        parse_heads("4.0", info)
    with pytest.raises(ValueError, match="not a head"):
        parse_heads("three", info)
