"""The `Circuit` type: every group needs a position, and a circuit found on the tiny model (one
group acting at a position set) survives JSON and a file unchanged, has one frame row per head
and a one-line repr."""

from __future__ import annotations

import json

import pytest

from et_circuits.core.circuit import Circuit, overlap
from et_circuits.core.errors import CircuitError
from et_circuits.methods.discovery import find_circuit
from et_circuits.tasks.entity_tracking.recipe import own_steps, path_patching_prompts

BINDER = ("labels+1", "labels+2")


@pytest.fixture(scope="module")
def found(tiny, vocab):
    """A circuit path patching finds on the tiny model: A and B at the last token, and a
    binder group at the two tokens after every label."""
    model, tok = tiny
    clean, corrupt = path_patching_prompts(tok, vocab, 12, 7, 4)
    steps = own_steps([*BINDER, "last"])
    return find_circuit(model, clean, corrupt, (2, 2, 3), steps).circuit


def test_every_group_needs_a_position():
    with pytest.raises(CircuitError, match="group 'b' has no position"):
        Circuit({"a": [(0, 1)], "b": [(1, 0)]}, {"a": "last"})
    with pytest.raises(CircuitError, match="group 'a'"):
        Circuit({"a": [(0, 1)]}, {"a": "labels+"})
    with pytest.raises(CircuitError, match="lists a head twice"):
        Circuit({"a": [(0, 1), (0, 1)]}, {"a": "last"})
    with pytest.raises(CircuitError, match="outside the model"):
        Circuit({"a": [(2, 0)]}, {"a": "last"}).validate(2, 4)
    assert Circuit({}) == Circuit({}, {}) and len(Circuit({})) == 0


def test_found_circuit(found):
    assert list(found.groups) == ["value_fetcher", "pos_transmitter", "binder"]
    assert found.positions == {"value_fetcher": "last", "pos_transmitter": "last", "binder": BINDER}
    assert found.positions_of("binder") == BINDER and found.positions_of("value_fetcher") == ("last",)
    assert [len(found.groups[g]) for g in found.groups] == [2, 2, 3]  # each step's top-k
    assert len(found) == 7
    found.validate(2, 4)


def test_circuit_round_trips_through_json_and_a_file(found, tmp_path):
    back = Circuit.from_dict(json.loads(json.dumps(found.to_dict())))
    assert back == found and back.positions["binder"] == BINDER
    found.save(tmp_path / "circuit.json")
    assert Circuit.load(tmp_path / "circuit.json") == found
    assert json.loads((tmp_path / "circuit.json").read_text())["positions"]["binder"] == list(BINDER)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CircuitError, match="not valid JSON"):
        Circuit.load(tmp_path / "bad.json")
    with pytest.raises(CircuitError, match="no circuit file"):
        Circuit.load(tmp_path / "missing.json")


def test_circuit_frame_and_repr(found):
    frame = found.to_frame()
    assert list(frame.columns) == ["group", "layer", "head", "rank", "positions"]
    assert len(frame) == len(found)
    assert [(r.group, (r.layer, r.head)) for r in frame.itertuples()] == found.entries()
    assert list(frame[frame.group == "value_fetcher"]["rank"]) == list(range(len(found.groups["value_fetcher"])))
    assert list(frame[frame.group == "binder"].positions) == ["labels+1, labels+2"] * 3
    text = repr(found)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    layer, head = found.groups["value_fetcher"][0]
    assert text.startswith(f"Circuit(value_fetcher: L{layer}H{head} ") and "@ labels+1, labels+2" in text


def test_without_keep_only_and_overlap(found):
    first = ("value_fetcher", found.groups["value_fetcher"][0])
    smaller = found.without([first])
    assert len(smaller) == len(found) - 1 and smaller.positions == found.positions
    assert found.keep_only([first]).entries() == [first]
    assert overlap(found, smaller)["value_fetcher"] == (1, 2)
