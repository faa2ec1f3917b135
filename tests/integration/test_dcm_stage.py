"""The `dcm` and `dcm-figure` commands end to end on two tiny random checkpoints: every section of
dcm.json (the base circuit and each model's own, at the paper's and the discovered positions),
a rerun that trains nothing and writes the same files, Figure 2 and dcm.csv, and one-line
errors."""

import json

import pandas as pd

from et_circuits.core.circuit import Circuit
from et_circuits.methods import dcm
from et_circuits.pipeline.cli import main
from et_circuits.pipeline.results import selected_heads
from et_circuits.tasks.entity_tracking import desiderata
from et_circuits.tasks.entity_tracking.paper import paper_circuit
from tests.conftest import make_checkpoint


def _circuit(groups):
    return paper_circuit({g: hs for g, hs in groups.items()})


def test_dcm_commands(tmp_path, tiny_dir, monkeypatch, capsys):
    other_dir = tmp_path / "tiny-ft"
    make_checkpoint(other_dir, seed=7)
    results, figures = tmp_path / "results", tmp_path / "figures"
    base, ft = tiny_dir.name, other_dir.name
    _circuit(
        {
            "value_fetcher": [(1, 0), (1, 1)],
            "pos_transmitter": [(1, 3)],
            "pos_detector": [(0, 1)],
            "struct_reader": [(0, 3)],
        }
    ).save(results / base / "circuit.json")
    _circuit(
        {"value_fetcher": [(1, 0), (1, 2)], "pos_transmitter": [(1, 3)], "pos_detector": [(0, 1)], "struct_reader": []}
    ).save(results / ft / "circuit.json")
    binder = ("prev_query_label+1", "prev_query_label+2")  # a discovered group acting at two positions
    for name, fetchers in ((base, [(1, 1)]), (ft, [(1, 2)])):
        Circuit(
            {"value_fetcher": fetchers, "binder": [(0, 0), (0, 2)]}, {"value_fetcher": "last", "binder": binder}
        ).save(results / name / "discovered" / "circuit.json")
    common = [
        "--base",
        str(tiny_dir),
        "--results",
        str(results),
        "--n-train",
        "32",
        "--n-eval",
        "16",
        "--n-test",
        "16",
        "--seeds",
        "2",
        "--batch-size",
        "16",
        "--resamples",
        "5",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(["dcm", "--model", str(tiny_dir), *common]) == 0
    assert main(["dcm", "--model", str(other_dir), *common]) == 0

    own = json.loads((results / base / "dcm.json").read_text())
    assert own["base_circuit"] == own["own_circuit"] and own["base"] == base
    groups = own["base_circuit"]["groups"]
    assert set(groups["pos_transmitter"]) == set(desiderata.ALL)
    assert set(groups["value_fetcher"]) == set(desiderata.MAIN)
    entry = groups["value_fetcher"]["object_value"]
    assert set(entry["seeds"]) == {"0", "1"} and len(entry["accuracy"]) == 5
    assert entry["heads"] == entry["seeds"][str(entry["selected_seed"])]["heads"]
    assert all(h in [[1, 0], [1, 1]] for h in entry["heads"])

    ft_result = json.loads((results / ft / "dcm.json").read_text())
    assert ft_result["own_circuit"]["circuit"] == ft and ft_result["base_circuit"]["circuit"] == base
    assert ft_result["own_circuit"]["group_heads"]["struct_reader"] == []
    assert set(ft_result["base_circuit"]["groups"]["pos_transmitter"]) == set(desiderata.MAIN)
    own_groups = ft_result["own_circuit"]["groups"]  # what CMAP patches, read as cmap reads it
    assert {g: set(d) for g, d in own_groups.items()} == {
        "value_fetcher": {"object_value"},
        "pos_transmitter": {"positional"},
        "pos_detector": {"positional"},
    }
    assert all(h in {(1, 0), (1, 2)} for h in selected_heads(ft_result)["value_fetcher"]["object_value"])

    # the discovered reading: every group on the main desiderata at its own positions (the binder
    # at both of its), and on the fine-tuned model's own circuit what CMAP patches
    discovered = own["base_discovered"]
    assert discovered["positions"]["binder"] == list(binder) and set(discovered["groups"]) == {
        "value_fetcher",
        "binder",
    }
    assert set(discovered["groups"]["binder"]) == set(desiderata.MAIN)
    assert all(h in [[0, 0], [0, 2]] for e in discovered["groups"]["binder"].values() for h in e["heads"])
    assert {g: set(d) for g, d in ft_result["own_discovered"]["groups"].items()} == {"value_fetcher": {"object_value"}}

    # a rerun of both models in one process trains nothing and writes the same files
    monkeypatch.setattr(dcm.protocol, "train_masks", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main(["dcm", "--model", str(tiny_dir), str(other_dir), *common, "--figures", str(figures)]) == 0
    assert json.loads((results / base / "dcm.json").read_text()) == own
    assert json.loads((results / ft / "dcm.json").read_text()) == ft_result
    drawn = (results / "dcm.csv").read_text()  # the training process drew Figure 2 too
    assert (figures / "dcm.json").exists()
    (results / "dcm.csv").unlink()

    figure_args = [
        "--base",
        str(tiny_dir),
        "--models",
        str(tiny_dir),
        str(other_dir),
        "--results",
        str(results),
        "--figures",
        str(figures),
    ]
    assert main(["dcm-figure", *figure_args]) == 0
    assert (results / "dcm.csv").read_text() == drawn
    frame = pd.read_csv(results / "dcm.csv")
    paper = 2 * (4 * 3 + 11) + 4 * 3 + 3  # base: both sections with extras; ft: main + CMAP's
    assert len(frame) == paper + 2 * 2 * 3 + 2 * 3 + 1  # discovered: base both sections; ft main + CMAP's
    assert frame.accuracy_mean.between(0, 100).all()
    assert set(frame[frame.group == "binder"].position) == {", ".join(binder)}
    for stem in ("dcm", "dcm_extra", "dcm_discovered"):
        assert (figures / f"{stem}.html").stat().st_size > 0 and (figures / f"{stem}.png").stat().st_size > 0

    capsys.readouterr()
    assert main(["dcm-figure", *figure_args[:1], str(other_dir), *figure_args[2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "circuit" in err[0]
    assert main(["dcm", "--model", str(tiny_dir), "--base", "missing", "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no circuit at" in err[0]
