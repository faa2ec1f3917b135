"""Minimality, completeness, and the `circuit` / `table1` / `figures` commands end to end on
tiny random checkpoints."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from et_circuits import models
from et_circuits.pipeline import cli
from et_circuits.core.settings import RunSettings
from et_circuits.methods import evaluation, minimality
from et_circuits.methods import path_patching as pp
from et_circuits.core.circuit import Circuit
from et_circuits.tasks.entity_tracking import data
from et_circuits.core.errors import CircuitError
from et_circuits.methods.evaluation import ablated_accuracy, position_means
from et_circuits.presentation import circuit_diagram, save_figure, step_heatmaps
from et_circuits.pipeline.stages.table1 import overlap_frame
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from et_circuits.tasks.entity_tracking.paper import paper_circuit
from tests.conftest import make_checkpoint



# ---------------------------------------------------------------------------------------------
# Minimality on a synthetic score


def _synthetic():
    """F = 0.4 per essential head present + 0.005 per other head: only essentials matter."""
    circuit = paper_circuit(
        {
            "value_fetcher": [(3, 0), (3, 1), (2, 2)],
            "pos_transmitter": [(2, 0)],
            "pos_detector": [(1, 0), (1, 1)],
            "struct_reader": [(0, 3)],
        }
    )
    essential = {("value_fetcher", (3, 0)), ("pos_detector", (1, 1))}

    def score(c: Circuit) -> float:
        present = {(g, h) for g, hs in c.groups.items() for h in hs}
        return 0.4 * len(present & essential) + 0.005 * len(present - essential)

    return circuit, essential, score


def test_minimality_prunes_only_heads_that_do_not_matter():
    circuit, essential, score = _synthetic()
    pruned, log = minimality.minimal(circuit, score, threshold=0.03, progress=False)
    kept = {(g, h) for g, hs in pruned.groups.items() for h in hs}
    assert kept == essential
    assert len(log) == len(circuit)  # every head tested once
    assert all(r["removed"] == ((r["group"], tuple(r["head"])) not in essential) for r in log)
    assert score(pruned) >= score(circuit) - 0.03


def test_minimality_bounds_the_total_loss():
    """Each small head alone is below the threshold, but their sum is not: pruning stops
    before the circuit loses more than the threshold."""
    circuit = paper_circuit({"value_fetcher": [(0, h) for h in range(8)]})
    score = lambda c: 0.02 * len(c.groups["value_fetcher"])  # noqa: E731
    pruned, _ = minimality.minimal(circuit, score, threshold=0.05, progress=False)
    assert score(pruned) >= score(circuit) - 0.05
    assert 0 < len(pruned) < len(circuit)


def test_minimality_threshold_zero_keeps_everything():
    circuit, _, score = _synthetic()
    pruned, _ = minimality.minimal(circuit, score, threshold=0.0, progress=False)
    assert pruned.groups == circuit.groups
    with pytest.raises(CircuitError):
        minimality.minimal(circuit, score, threshold=1.5)


# ---------------------------------------------------------------------------------------------
# Completeness on a tiny model whose answers are its own predictions (full accuracy = 1)


@pytest.fixture(scope="module")
def predicted(tiny_dir, vocab):
    model, tok, _ = models.load(tiny_dir, device="cpu")  # a copy: the weights are scaled below
    with torch.no_grad():
        for p in model.parameters():  # sizeable head effects
            if p.ndim >= 2:
                p.mul_(10)
    batch = data.make_prompts(tok, data.sample_prompts(vocab, 24, 7, 11))
    with torch.no_grad():
        own = model(batch.input_ids)[torch.arange(len(batch)), batch.position("last")].argmax(-1)
    reference = data.make_prompts(tok, data.sample_prompts(vocab, 24, 7, 12))
    return model, batch.replace(answers=own), position_means(model, reference)


def test_position_means_cache(tiny_dir, vocab, tmp_path, monkeypatch):
    """Cached means equal fresh ones; a second call reads the file; other weights, other
    prompts or another batch size get their own file."""
    model, tok, _ = models.load(tiny_dir, device="cpu")
    reference = data.make_prompts(tok, data.sample_prompts(vocab, 10, 7, 12))
    fresh = position_means(model, reference, RunSettings(batch_size=4))
    cached = position_means(model, reference, RunSettings(batch_size=4), tmp_path)
    assert torch.equal(cached, fresh) and len(list(tmp_path.glob("means-*.safetensors"))) == 1

    def no_forward(*a, **k):
        raise AssertionError("the cached means were recomputed")

    monkeypatch.setattr(evaluation, "mean_activations", no_forward)
    assert torch.equal(position_means(model, reference, RunSettings(batch_size=4), tmp_path), fresh)
    monkeypatch.undo()
    other = data.make_prompts(tok, data.sample_prompts(vocab, 10, 7, 13))
    position_means(model, other, RunSettings(batch_size=4), tmp_path)
    position_means(model, reference, RunSettings(batch_size=5), tmp_path)
    with torch.no_grad():
        model.blocks[0].attn.W_O[0, 0, 0] += 1.0  # layer 1 reads it
    changed = position_means(model, reference, RunSettings(batch_size=4), tmp_path)
    assert len(list(tmp_path.glob("means-*.safetensors"))) == 4
    assert not torch.equal(changed, fresh)


@pytest.mark.parametrize("ablate_circuit", [False, True])
def test_fast_ablation_equals_the_full_forwards(predicted, ablate_circuit):
    """Restarting each row from the shared run at its first kept position gives the logits of
    a full forward per row (circuits at single positions, at position sets, and empty ones)."""
    model, batch, means = predicted
    circuits = [
        paper_circuit({"value_fetcher": [(1, 0), (0, 2)], "pos_transmitter": [(0, 1)]}),  # paper positions
        Circuit({"binder": [(0, 0), (0, 3)], "value_fetcher": [(1, 1)]}, {"binder": ["labels+1", "labels+2"], "value_fetcher": "last"}),
        Circuit({"value_fetcher": [(1, 2)]}, {"value_fetcher": "query_label"}),
        Circuit({}),
    ]
    settings = RunSettings(batch_size=5, max_rows=12)  # several passes, some of one prompt
    got = {m: torch.zeros(len(circuits), len(batch), model.cfg.d_vocab) for m in evaluation.METHODS}
    for m in got:
        for which, row, logits in evaluation.ablated_last_logits(model, circuits, batch, means, settings, ablate_circuit, m):
            got[m][which, row] = logits.float()
    assert got["fast"].abs().amax((1, 2)).min() > 0  # every row was written
    torch.testing.assert_close(got["fast"], got["reference"], atol=1e-4, rtol=1e-4)
    assert (got["reference"][0] - got["reference"][1]).abs().max() > 1e-2  # the circuits differ
    assert minimality.ablated_accuracies(model, circuits, batch, means, settings, ablate_circuit) == \
        minimality.ablated_accuracies(model, circuits, batch, means, settings, ablate_circuit, "reference")


def test_model_without_ablates_the_heads(predicted):
    model, batch, means = predicted
    assert ablated_accuracy(model, Circuit({}), batch, means, ablate_circuit=True) == 1.0
    everything = paper_circuit({"value_fetcher": [(l, h) for l in range(2) for h in range(4)]})
    assert ablated_accuracy(model, everything, batch, means, ablate_circuit=True) < 1.0


def test_completeness_rows(predicted):
    model, batch, means = predicted
    circuit = paper_circuit({"value_fetcher": [(1, 0), (1, 2)], "pos_detector": [(0, 1)], "struct_reader": []})
    rows = minimality.completeness(model, circuit, batch, means, n_random=3, seed=0)
    assert [r["kind"] for r in rows] == ["group", "group", "random", "random", "random"]
    for r in rows:
        assert r["size"] == len(r["heads"]) > 0
        assert r["gap"] == pytest.approx(abs(r["circuit_without"] - r["model_without"]))
    group = rows[0]
    assert group["name"] == "value_fetcher"
    rest = circuit.without([("value_fetcher", (1, 0)), ("value_fetcher", (1, 2))])
    expect = ablated_accuracy(model, rest, batch, means)
    assert group["circuit_without"] == expect
    again = minimality.completeness(model, circuit, batch, means, n_random=3, seed=0)
    assert again == rows  # seeded


# ---------------------------------------------------------------------------------------------
# Overlap and figures


def test_overlap_frame():
    base = paper_circuit({"value_fetcher": [(1, 0), (1, 1), (2, 3)], "struct_reader": [(0, 0)]})
    other = paper_circuit({"value_fetcher": [(1, 1), (2, 3), (3, 3)], "pos_detector": [(0, 0)]})
    frame = overlap_frame(base, {"ft": other}, "discovered")
    assert frame.to_dict("records") == [
        {"model": "ft", "positions": "discovered", "group": "A", "shared": 2, "base_size": 3, "overlap": "2/3"},
        {"model": "ft", "positions": "discovered", "group": "D", "shared": 0, "base_size": 1, "overlap": "0/1"},
    ]


def test_save_figure_writes_html_and_png(tmp_path):
    scores = {s.group: torch.randn(3, 4) for s in PAPER_STEPS}
    circuit = paper_circuit(
        {"value_fetcher": [(2, 1)], "pos_transmitter": [(1, 3)], "pos_detector": [(0, 0)], "struct_reader": []}
    )
    written = save_figure(step_heatmaps(scores, circuit), "heat", tmp_path)
    assert [p.name for p in written] == ["heat.html", "heat.json", "heat.png"]
    html = written[0].read_text()
    assert "plotly" in html and "<script" in html and len(html) > 1_000_000  # plotly.js inlined
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_figure(circuit_diagram(circuit, n_layers=3), "diagram", tmp_path, png=False)
    assert (tmp_path / "diagram.html").exists() and not (tmp_path / "diagram.png").exists()


# ---------------------------------------------------------------------------------------------
# The commands, end to end


SMALL = ["--device", "cpu", "--n", "12", "--batch-size", "6"]
CIRCUIT_SMALL = [
    *SMALL, "--minimality-n", "12", "--reference-n", "12", "--completeness-random", "2", "--max-rows", "40"
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
        stems |= {f"{name}_path_patching", f"{name}_completeness", f"{name}_discovered_path_patching",
                  f"{name}_discovered_completeness", f"{name}_sweep"}
    assert {p.name for p in figs.iterdir()} == {f"{s}.{ext}" for s in stems for ext in ("html", "json", "png")}
    drawn = (figs / "table1.json").read_text()
    (figs / "table1.json").unlink()  # the `figures` command redraws from the files alone
    args = ["figures", "--base", base, "--models", base, tuned, "--results", str(results), "--figures", str(figs)]
    assert cli.main(args) == 0
    assert (figs / "table1.json").read_text() == drawn


def test_commands_fail_with_one_line(tmp_path, capsys, two_models):
    base = str(two_models / "base-model")
    assert cli.main(["table1", "--base", base, "--models", base, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no circuit file") and "\n" not in err
    (tmp_path / "base-model").mkdir()
    (tmp_path / "base-model" / "circuit.json").write_text("{not json")
    assert cli.main(["figures", "--base", base, "--models", base, "--results", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert cli.main(["circuit", "--model", "no-such-model", "--results", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["circuit", "--model", base, "--top-k", "1", "2", "3"])
    with pytest.raises(SystemExit):
        cli.main(["circuit", "--model", base, "--top-k-cap", "2"])
