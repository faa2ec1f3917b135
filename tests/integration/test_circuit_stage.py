"""The `circuit`, `table1` and `figures` commands end to end on two tiny random checkpoints: both
readings of each circuit, step scores reused on a rerun, Table 1 and overlap, and every figure
redrawn from the files alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from et_circuits.core.circuit import Circuit
from et_circuits.core.io import read_tensors
from et_circuits.pipeline import cli
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from tests.conftest import make_checkpoint

SMALL = ["--device", "cpu", "--n", "12", "--batch-size", "6"]
CIRCUIT_SMALL = [
    *SMALL,
    "--minimality-n",
    "12",
    "--reference-n",
    "12",
    "--completeness-random",
    "2",
    "--max-rows",
    "40",
]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    for i, name in enumerate(["base-model", "tuned-model"]):
        make_checkpoint(root / name, n_layers=3, n_heads=2, d_model=16, seed=10 + i)
    return root


def test_circuit_table1_figures(two_models, tmp_path, capsys):
    results, figs = tmp_path / "results", tmp_path / "figs"
    base, tuned = str(two_models / "base-model"), str(two_models / "tuned-model")
    for model in (base, tuned):  # threshold 0 keeps the top-k, so the circuits are not empty
        args = ["circuit", "--model", model, "--results", str(results), *CIRCUIT_SMALL, "--minimality-threshold", "0"]
        assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "circuit A=1/1" in out and "reused" not in out
    for name in ("base-model", "tuned-model"):
        d = results / name
        assert sorted(p.name for p in (d / "path_patching").iterdir()) == sorted(
            f"{s.group}.safetensors" for s in PAPER_STEPS
        )
        circuit = Circuit.load(d / "circuit.json")
        sizes = [len(circuit.groups[s.group]) for s in PAPER_STEPS]
        assert sizes[:2] == [1, 1] and max(sizes) == 1  # 6 heads: cap 1
        for receiver, sender in zip(PAPER_STEPS, PAPER_STEPS[1:]):  # a group only below its receivers
            top = max((l for l, _ in circuit.groups[receiver.group]), default=0)
            assert all(l < top for l, _ in circuit.groups[sender.group])
        assert json.loads((d / "minimality.json").read_text())["top_k"] == [1, 1, 1, 1]
        assert len(json.loads((d / "completeness.json").read_text())["rows"]) == len(circuit) + 2
        found = Circuit.load(d / "discovered" / "circuit.json")  # the sweep's reading
        sweep = json.loads((d / "discovered" / "sweep.json").read_text())
        assert sweep["marked"] and len(sweep["layers"]) == len(sweep["positions"])
        assert {p for g in found.groups for p in found.positions_of(g)} <= {*sweep["marked"], "last"}
    discovered = {n: Circuit.load(results / n / "discovered" / "circuit.json") for n in ("base-model", "tuned-model")}

    before = (results / "base-model" / "path_patching" / "value_fetcher.safetensors").stat().st_mtime_ns
    args = ["circuit", "--model", base, "--results", str(results), *CIRCUIT_SMALL, "--minimality-threshold", "0"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count("reused") == 4 + len(discovered["base-model"].groups)
    assert (results / "base-model" / "path_patching" / "value_fetcher.safetensors").stat().st_mtime_ns == before

    table = ["table1", "--base", base, "--models", base, tuned, "--results", str(results)]
    assert cli.main([*table, *SMALL, "--reference-n", "12", "--random", "2", "--figures", str(figs)]) == 0
    frame = pd.read_csv(results / "table1.csv")
    assert list(frame.columns) == ["model", "positions", "full", "circuit", "random", "faithfulness", "slots"]
    assert list(frame.model) == ["base-model"] * 2 + ["tuned-model"] * 2
    assert list(frame.positions) == ["paper", "discovered"] * 2
    assert frame.slots.between(0, 1).all() and (frame.full.diff()[1::2] == 0).all()  # one full model per model
    assert (results / "table1.md").read_text().count("\n| ") == 5  # header + 4 rows
    ov = pd.read_csv(results / "overlap.csv")
    assert list(ov.model.unique()) == ["tuned-model"] and len(ov) == 4 + len(discovered["base-model"].groups)

    stems = {"table1", "base-model_circuit", "base-model_discovered_circuit"}
    for name in ("base-model", "tuned-model"):
        stems |= {
            f"{name}_path_patching",
            f"{name}_completeness",
            f"{name}_discovered_path_patching",
            f"{name}_discovered_completeness",
            f"{name}_sweep",
        }
    assert {p.name for p in figs.iterdir()} == {f"{s}.{ext}" for s in stems for ext in ("html", "json", "png")}
    drawn = (figs / "table1.json").read_text()
    (figs / "table1.json").unlink()  # the `figures` command redraws from the files alone
    args = ["figures", "--base", base, "--models", base, tuned, "--results", str(results), "--figures", str(figs)]
    assert cli.main(args) == 0
    assert (figs / "table1.json").read_text() == drawn


def test_screened_circuit_stage(two_models, tmp_path, capsys):
    """`circuit --screen N`: circuit.json says the circuit was screened and with which N, the step
    files keep every sender's attribution beside the exact scores (NaN where not scored
    exactly), and an exact rerun does not reuse the screened steps."""
    results, base = tmp_path / "results", str(two_models / "base-model")
    args = ["circuit", "--model", base, "--results", str(results), *CIRCUIT_SMALL, "--minimality-threshold", "0"]
    assert cli.main([*args, "--screen", "2"]) == 0
    assert "screened N=2" in capsys.readouterr().out
    d = results / "base-model"
    chosen = json.loads((d / "circuit.json").read_text())["chosen_by"]
    assert chosen == {"method": "fast", "screen": 2, "ig_steps": 1}
    tensors = read_tensors(d / "path_patching" / "value_fetcher.safetensors")
    assert not tensors["attribution"].isnan().any() and int((~tensors["scores"].isnan()).sum()) == 2
    assert torch.equal(tensors["exact"], ~tensors["scores"].isnan())  # which senders were scored exactly
    assert cli.main(args) == 0
    assert "reused" not in capsys.readouterr().out
    assert json.loads((d / "circuit.json").read_text())["chosen_by"]["screen"] is None
