"""The exploration notebook runs top to bottom on the organism (every cell, no errors)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from et_circuits import models

pytestmark = pytest.mark.xdist_group("processes")  # starts processes: one such test at a time (make test)


NOTEBOOK = Path(__file__).resolve().parents[2] / "experiments" / "explore.ipynb"


def test_notebook_runs(tmp_path):
    assert (models.ORGANISM_DIR / "organism-llama" / "config.json").exists(), "organism weights missing"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "accuracy:" in text and "selected heads:" in text and "base " in text and "marked positions:" in text
    assert "goat's value fetchers for variable binding" in text and "base with goat's fetchers" in text
