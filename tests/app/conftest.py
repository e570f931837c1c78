"""Run files for the explorer's tests: two scans of the tiny random GQA Llama (2 layers, 4 query
heads, 2 KV heads) on different prompts (one holding a hand-made circuit), two scans of the
toy-ioi reference model (on its own vocabulary, with a circuit of its card's heads, and on prose
it reads as unknown tokens), a corrupt file and a foreign HDF5 file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

PROMPTS_A = [
    "the cat sat on the mat",
    "when mary and john went to the store john gave a drink to mary",
    "the dog ran to the park and the bird sat on the tree",
]
PROMPTS_B = ["it was a big red house", "the sun was small and the night was blue"]
TOY_IOI_PROMPTS = [
    "When Mary and John went to the store , John gave a drink to",
    "Then Alice and Bob went to the park , Bob gave a ball to",
]


def _prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    import workbench

    root = tmp_path_factory.mktemp("app")
    runs = root / "runs"
    for name, texts in (("a", PROMPTS_A), ("b", PROMPTS_B)):
        prompts = _prompts(root / f"{name}.jsonl", texts)
        workbench.scan(
            tiny_model, str(prompts), probes="sink,entropy", out=runs / f"{name}.h5", progress=False
        )
    _store_circuit(runs / "a.h5", tiny_model.info)
    toy = workbench.load("toy-ioi", device="cpu")  # the lab ablates its known name mover
    prompts = _prompts(root / "toy.jsonl", TOY_IOI_PROMPTS)
    workbench.scan(
        toy,
        str(prompts),
        probes="sink,entropy,hidden_sink",
        out=runs / "toy-ioi.h5",
        progress=False,
    )
    _store_toy_circuit(runs / "toy-ioi.h5", toy.info)
    prose = _prompts(root / "prose.jsonl", PROMPTS_B)  # words toy-ioi's vocabulary lacks
    workbench.scan(
        toy, str(prose), probes="sink,entropy", out=runs / "toy-prose.h5", progress=False
    )
    (runs / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with h5py.File(runs / "foreign.h5", "w") as f:
        f["data"] = [1, 2, 3]
    (root / "secret.h5").write_bytes(b"outside the runs directory")
    return runs


def _store_circuit(run: Path, info) -> None:
    """A hand-made circuit on the tiny model's heads: the viewer's input format, not a finding."""
    from interventions.circuit import Circuit, CircuitEdge, CircuitHead

    heads = [
        CircuitHead(1, 2, "name mover", {"dla": 0.8, "end_io": 0.6}),
        CircuitHead(0, 1, "s-inhibition", {"dla": 0.1}),
        CircuitHead(0, 3, "induction", {"dla": 0.05}),
    ]
    edges = [
        CircuitEdge("1.2", "logits", "direct", -0.7),
        CircuitEdge("0.1", "1.2", "q", -0.3),
        CircuitEdge("0.3", "0.1", "v", None),
    ]
    metrics = {"clean_logit_diff": 1.5, "abc_logit_diff": 0.1, "clean_accuracy": 0.75}
    task = {"task": "ioi", "n_prompts": 8, "seed": 0}
    Circuit(info.to_dict(), task, heads, edges, metrics).store(run, "ioi")


def _store_toy_circuit(run: Path, info) -> None:
    """toy-ioi's heads as its card classes them (data/models/toy-ioi/heads.json: name mover 1.1,
    S-inhibition-like 0.1, with the card's accuracy drop when each is ablated), stored as a
    circuit of the ``ioi-toy`` task so the Head page can show the circuit's prompts. The edges
    are hand-made: the viewer's input format, not a finding."""
    from interventions.circuit import Circuit, CircuitEdge, CircuitHead

    heads = [
        CircuitHead(1, 1, "name mover", {"accuracy_drop": 0.563}),
        CircuitHead(0, 1, "s-inhibition", {"accuracy_drop": 0.403}),
    ]
    edges = [CircuitEdge("1.1", "logits", "direct", 0.5), CircuitEdge("0.1", "1.1", "q", -0.3)]
    task = {"task": "ioi-toy", "n_prompts": 8, "seed": 0}
    Circuit(info.to_dict(), task, heads, edges, {}).store(run, "ioi-toy")
