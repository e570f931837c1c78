"""examples/tour.ipynb runs top to bottom on the CPU (nbclient, in a temp working directory)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TOUR = Path(__file__).resolve().parents[2] / "examples" / "tour.ipynb"


@pytest.mark.slow
def test_tour_notebook_executes(tmp_path, smollm2):  # smollm2: the GGUF cache is warm
    notebook = nbformat.read(TOUR, as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "runs" / "tour.h5").exists()
    assert (tmp_path / "runs" / "tour-map" / "full_attention_heads.tsv").exists()
