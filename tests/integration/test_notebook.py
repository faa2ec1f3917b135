"""The exploration notebook runs top to bottom on the organism (every cell, no errors), from its
own folder as a reader would run it, and its committed outputs are current: every code cell
has them, with as many figures as a fresh run draws, and no path of the machine it ran on."""

import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from et_circuits import models

pytestmark = pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)


NOTEBOOK = Path(__file__).resolve().parents[2] / "experiments" / "explore.ipynb"


def figures(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def test_notebook_runs_and_its_outputs_are_current():
    assert (models.ORGANISM_DIR / "organism-llama" / "config.json").exists(), "organism weights missing"
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nb = copy.deepcopy(committed)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for expected in (
        "accuracy:",
        "of its attention on the two tokens after the queried label",
        "selected heads:",
        "base ",
        "Knockout(",
        "reading ",
        "marked positions:",
        "goat's value fetchers for variable binding",
        "base with goat's fetchers",
    ):
        assert expected in text, expected
    code = [(old, new) for old, new in zip(committed.cells, nb.cells) if new.cell_type == "code"]
    assert all(old.execution_count is not None for old, _ in code), "commit the notebook with its outputs"
    assert [(bool(old.outputs), figures(old)) for old, _ in code] == [
        (bool(new.outputs), figures(new)) for _, new in code
    ]
    assert sum(figures(new) for _, new in code) >= 10  # Figures 1-3, DCM, CMAP, knockout and the rest
    saved = nbformat.writes(committed)
    assert str(NOTEBOOK.parents[1]) not in saved and "/home/" not in saved and "/root/" not in saved
