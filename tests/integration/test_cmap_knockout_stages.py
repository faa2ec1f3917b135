"""The `cmap` and `knockout` CLI stages (`et_circuits.pipeline.cli.main`) on tiny random
checkpoints standing in for the organism models: the CSV files and figures they write, and a
missing input as a one-line error with exit status 2."""

import json
import math

import pandas as pd
import pytest

from et_circuits.pipeline import cli
from et_circuits.tasks.entity_tracking import recipe
from tests.conftest import make_checkpoint
from tests.unit.methods.test_cmap import CIRCUIT, DCM


def _capture_figures(monkeypatch) -> list:
    """Figures the stages would save, as (figure, stem), instead of writing them."""
    saved = []
    monkeypatch.setattr(
        "et_circuits.presentation.save_figures", lambda todo, directory: saved.extend((fig, stem) for stem, fig in todo)
    )
    return saved


# ---------------------------------------------------------------------------------------------
# cmap


@pytest.fixture
def cmap_env(tiny_dir, tmp_path_factory, monkeypatch):
    """organism-llama -> the tiny checkpoint, organism-float -> a second random one."""
    other = tmp_path_factory.mktemp("tiny-float")
    make_checkpoint(other, seed=1)
    monkeypatch.setenv("ET_CIRCUITS_ORGANISM_LLAMA", str(tiny_dir))
    monkeypatch.setenv("ET_CIRCUITS_ORGANISM_FLOAT", str(other))
    return _capture_figures(monkeypatch)


def test_cmap_cli_writes_csv_and_figures(cmap_env, tmp_path):
    results = tmp_path / "results"
    CIRCUIT.save(results / "organism-float" / "circuit.json")
    (results / "organism-float" / "dcm.json").write_text(json.dumps(DCM))
    argv = [
        "cmap",
        "--base",
        "organism-llama",
        "--models",
        "organism-float",
        "--results",
        str(results),
        "--n",
        "12",
        "--boxes",
        "3",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    frame = pd.read_csv(results / "cmap.csv")
    assert set(frame["set"]) == {"A", "B", "C", "D", "full"}
    assert set(frame["patch"]) == {"z", "q", "k", "v", "qk", "qkv"}
    assert (frame["source"] == "organism-float").all() and (frame["base"] == "organism-llama").all()
    c = frame[frame["set"] == "C"].iloc[0]
    assert math.isnan(c["accuracy"]) and "no heads" in c["note"]
    assert [stem for _, stem in cmap_env] == ["cmap", "cmap_input"]
    bars, base_line, source_line = cmap_env[0][0].data
    assert [x.split()[0] for x in bars.x] == ["D", "C", "B", "A", "full"]
    assert base_line.y[0] == frame["base_accuracy"].iloc[0]
    assert source_line.y[0] == frame["source_accuracy"].iloc[0]


def test_cmap_cli_missing_dcm_is_one_line_exit_2(cmap_env, tmp_path, capsys):
    results = tmp_path / "results"
    CIRCUIT.save(results / "organism-float" / "circuit.json")
    argv = ["cmap", "--base", "organism-llama", "--models", "organism-float", "--results", str(results)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dcm.json" in err


# ---------------------------------------------------------------------------------------------
# knockout


@pytest.fixture
def knockout_env(tiny_dir, monkeypatch):
    monkeypatch.setenv("ET_CIRCUITS_ORGANISM_LLAMA", str(tiny_dir))
    return _capture_figures(monkeypatch)


def test_knockout_cli_writes_curves(knockout_env, tmp_path):
    argv = [
        "knockout",
        "--model",
        "organism-llama",
        "--results",
        str(tmp_path),
        "--n",
        "10",
        "--boxes",
        "3",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    frame = pd.read_csv(tmp_path / "knockout.csv")
    assert len(frame) == len(recipe.EDGES) * 2
    assert list(frame.columns) == ["model", "edge", "from_layer", "accuracy", "full_accuracy", "n"]
    assert set(frame["from_layer"]) == {0, 1} and (frame["model"] == "organism-llama").all()
    assert [stem for _, stem in knockout_env] == ["knockout"]
    assert len(knockout_env[0][0].data) == len(recipe.EDGES)
