"""Minimality on a synthetic score, completeness on a tiny model whose answers are its own
predictions, and their result types (`Minimality`, `Completeness`)."""

from __future__ import annotations

import json
from functools import partial

import pytest

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.methods import minimality
from et_circuits.methods.evaluation import ablated_accuracy
from et_circuits.methods.minimality import Completeness, Minimality
from et_circuits.tasks.entity_tracking.paper import paper_circuit

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
    result = minimality.minimal(circuit, score, threshold=0.03, progress=False)
    pruned, log = result.circuit, [t.to_json() for t in result.tests]
    kept = {(g, h) for g, hs in pruned.groups.items() for h in hs}
    assert kept == essential
    assert len(log) == len(circuit)  # every head tested once
    assert all(r["removed"] == ((r["group"], tuple(r["head"])) not in essential) for r in log)
    assert score(pruned) >= score(circuit) - 0.03
    assert result.original == circuit and result.threshold == 0.03


def test_minimality_bounds_the_total_loss():
    """Each small head alone is below the threshold, but their sum is not: pruning stops
    before the circuit loses more than the threshold."""
    circuit = paper_circuit({"value_fetcher": [(0, h) for h in range(8)]})
    score = lambda c: 0.02 * len(c.groups["value_fetcher"])  # noqa: E731
    pruned = minimality.minimal(circuit, score, threshold=0.05, progress=False).circuit
    assert score(pruned) >= score(circuit) - 0.05
    assert 0 < len(pruned) < len(circuit)


def test_minimality_threshold_zero_keeps_everything():
    circuit, _, score = _synthetic()
    pruned = minimality.minimal(circuit, score, threshold=0.0, progress=False).circuit
    assert pruned.groups == circuit.groups
    with pytest.raises(CircuitError):
        minimality.minimal(circuit, score, threshold=1.5)


# ---------------------------------------------------------------------------------------------
# Completeness on a tiny model whose answers are its own predictions (full accuracy = 1)


def test_completeness_rows(predicted):
    model, batch, means = predicted
    circuit = paper_circuit({"value_fetcher": [(1, 0), (1, 2)], "pos_detector": [(0, 1)], "struct_reader": []})
    rows = minimality.completeness(model, circuit, batch, means, n_random=3, seed=0).to_json()["rows"]
    assert [r["kind"] for r in rows] == ["group", "group", "random", "random", "random"]
    for r in rows:
        assert r["size"] == len(r["heads"]) > 0
        assert r["gap"] == pytest.approx(abs(r["circuit_without"] - r["model_without"]))
    group = rows[0]
    assert group["name"] == "value_fetcher"
    rest = circuit.without([("value_fetcher", (1, 0)), ("value_fetcher", (1, 2))])
    expect = ablated_accuracy(model, rest, batch, means)
    assert group["circuit_without"] == expect
    again = minimality.completeness(model, circuit, batch, means, n_random=3, seed=0).to_json()["rows"]
    assert again == rows  # seeded


# ---------------------------------------------------------------------------------------------
# The result types, from real runs on the tiny model


@pytest.fixture(scope="module")
def pruned(predicted):
    """`minimal` with F = accuracy under mean ablation, and the completeness of its input."""
    model, batch, means = predicted
    circuit = paper_circuit({"value_fetcher": [(1, 0), (1, 2), (1, 3)], "pos_detector": [(0, 1), (0, 2)]})
    score = partial(_ablated, model=model, prompts=batch, means=means)
    found = minimality.minimal(circuit, score, threshold=0.05, progress=False)
    return found, minimality.completeness(model, circuit, batch, means, n_random=2, seed=3)


def _ablated(circuit, model, prompts, means):
    return ablated_accuracy(model, circuit, prompts, means)


def test_minimality_tests_are_the_scores(predicted, pruned):
    """Each test's `with` / `without` is F of the circuit at its turn with and without the head."""
    model, batch, means = predicted
    found, _ = pruned
    current = found.original
    for t in found.tests:
        assert t.with_ == ablated_accuracy(model, current, batch, means)
        assert t.without == ablated_accuracy(model, current.without([(t.group, t.head)]), batch, means)
        if t.removed:
            current = current.without([(t.group, t.head)])
    assert current == found.circuit


def test_minimality_round_trips_through_json(pruned):
    found, _ = pruned
    back = Minimality.from_json(json.loads(json.dumps(found.to_json())))
    assert back == found
    assert back.tests == found.tests and back.circuit.positions == found.circuit.positions


def test_minimality_frame_and_repr(pruned):
    found, _ = pruned
    frame = found.to_frame()
    assert list(frame.columns) == ["group", "layer", "head", "with", "without", "removed"]
    assert len(frame) == len(found.tests) == len(found.original)
    assert list(frame.removed) == [t.removed for t in found.tests]
    text = repr(found)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert f"kept {len(found.circuit)} of {len(found.original)} heads" in text


def test_completeness_round_trips_through_json(pruned):
    _, complete = pruned
    back = Completeness.from_json(json.loads(json.dumps(complete.to_json())))
    assert back == complete and [s.gap for s in back.sets] == [s.gap for s in complete.sets]


def test_completeness_frame_and_repr(pruned):
    _, complete = pruned
    frame = complete.to_frame()
    assert list(frame.columns) == ["kind", "name", "size", "circuit_without", "model_without", "gap"]
    assert len(frame) == len(complete.sets) == 2 + 2  # two groups, two random sets
    assert list(frame.gap) == [s.gap for s in complete.sets]
    text = repr(complete)
    worst = max(complete.sets, key=lambda s: s.gap)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert f"largest gap {worst.gap:.3f} ({worst.name})" in text
