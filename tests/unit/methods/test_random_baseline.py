"""Table 1's random baseline without luck: the random circuits evaluate_circuit draws are
checked themselves (group sizes and positions of the circuit, distinct heads in a group, the
same for the same seed and others for another), and `random` is the mean of their F."""

from __future__ import annotations

import pytest

from et_circuits.core.circuit import Circuit
from et_circuits.methods import evaluation
from et_circuits.tasks.entity_tracking.paper import paper_circuit


def test_random_baseline_is_the_mean_over_seeded_circuits_of_the_same_sizes(predicted, monkeypatch):
    model, batch, means = predicted
    circuit = paper_circuit({"value_fetcher": [(1, 0), (1, 2), (1, 3)], "pos_detector": [(0, 1)]})
    drawn: list = []
    real = evaluation.random_circuit
    monkeypatch.setattr(evaluation, "random_circuit", lambda *a: drawn.append(real(*a)) or drawn[-1])
    runs = {}
    for label, seed in (("first", 5), ("again", 5), ("other", 6)):
        drawn.clear()
        ev = evaluation.evaluate_circuit(model, circuit, batch, batch, n_random=4, seed=seed, means=means)
        runs[label] = (ev, [c.to_dict() for c in drawn])
    ev, circuits = runs["first"]
    assert len(circuits) == 4
    for c in circuits:
        assert {g: len(hs) for g, hs in c["groups"].items()} == {g: len(hs) for g, hs in circuit.groups.items()}
        assert c["positions"] == circuit.to_dict()["positions"]
        assert all(len(set(map(tuple, hs))) == len(hs) for hs in c["groups"].values())
    assert runs["again"][1] == circuits and runs["other"][1] != circuits
    f = [evaluation.ablated_accuracy(model, Circuit.from_dict(c), batch, means) for c in circuits]
    assert ev.random == pytest.approx(sum(f) / len(f), abs=1e-9)
    heads = {tuple(h) for c in circuits for hs in c["groups"].values() for h in hs}
    assert len(heads) > 4, "the draws cover few heads: not uniform over the model"
