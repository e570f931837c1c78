"""The paper's own model: GPT-2 small's published name movers and S-inhibition heads must be found.

Needs the Hugging Face hub (the conftest sets HF_HUB_OFFLINE=1; run with HF_HUB_OFFLINE=0 and the
network to include it).
"""

import os
import socket

import pytest

from interventions.ioi import GPT2_SMALL_IOI


def hub_unreachable() -> str | None:
    """Why the hub cannot be used, or None."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set (the test suite runs offline by default)"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        return f"huggingface.co is unreachable ({e})"
    return None


@pytest.mark.network
@pytest.mark.slow
def test_gpt2_small_name_movers_and_s_inhibition_heads_are_found():
    reason = hub_unreachable()
    if reason:
        pytest.skip(f"needs gpt2 from the Hugging Face hub: {reason}")
    import workbench
    from interventions.ioi import find_circuit

    model = workbench.load("gpt2")
    circuit = find_circuit(model, n=32, seed=0, exact_heads=48, max_senders=30, checks=False)
    found = circuit.by_class()
    movers = set(found.get("name mover", [])) | set(found.get("backup name mover", []))
    assert len(movers & set(GPT2_SMALL_IOI["name mover"])) >= 2, found
    assert len(set(found.get("s-inhibition", [])) & set(GPT2_SMALL_IOI["s-inhibition"])) >= 2, found
    assert circuit.metrics["clean_logit_diff"] > 2
