"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported anywhere in the process; this file
sets it when pytest collects tests/kernels, which is early enough unless another conftest or an
earlier-collected test module already imported triton (then the root conftest must set it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture
def interpreter() -> None:
    """Skip unless the kernels run under Triton's CPU interpreter."""
    pytest.importorskip("triton")
    from kernels.attention_stats import interpreting

    if not interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
