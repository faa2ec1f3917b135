"""The paper's DCM protocol over asks (`recipe.run_dcm`) on the tiny model: one result per ask,
seeds kept apart, every training reported to `on_seed`, and finished trainings reused."""

import pytest

from et_circuits.core.circuit import Circuit
from et_circuits.methods import dcm
from et_circuits.tasks.entity_tracking import recipe

ASKS = [
    recipe.Ask(((1, 0), (1, 3)), "last", "object_value"),
    recipe.Ask(((1, 0), (1, 3)), "last", "object_value"),  # the same ask from another circuit
    recipe.Ask(((0, 3),), "prev_query_label", "positional"),
    recipe.Ask((), "query_label", "positional"),  # an empty group
]


def test_run_dcm_shares_data_and_reuses_results(tiny, monkeypatch):
    """One result per ask, seeds kept apart, every training reported under (ask, seed); a rerun
    given those trainings trains nothing and gives the same results."""
    model, tok = tiny
    plan = recipe.DCMPlan(dcm.DCMConfig(batch_size=16), (32, 16, 16), 7, data_seed=5, seeds=(0, 1), resamples=4)
    saved = {}
    first = recipe.run_dcm(model, tok, ASKS, plan, on_seed=lambda a, s, r: saved.__setitem__((a, s), r))
    assert len(first) == 3 and len(saved) == 3 * 2
    assert set(saved) == {(a, s) for a in ASKS for s in plan.seeds}
    empty = first[ASKS[3]]
    assert empty.selected == [] and all(r.steps == 0 and len(r.test_values) == 16 for r in empty.seeds.values())
    for ask, result in first.items():
        assert set(result.seeds) == {0, 1} and len(result.resampled) == 4
        assert (result.heads, result.position) == (ask.heads, ask.position)
        for seed, r in result.seeds.items():
            assert r is saved[(ask, seed)]
            assert r.test_score == pytest.approx(r.test_values.float().mean().item())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished training was run again")

    monkeypatch.setattr(dcm.protocol, "train_masks", no_training)
    again = recipe.run_dcm(model, tok, ASKS, plan, finished=lambda a, s: saved.get((a, s)))
    assert set(again) == set(first)
    for ask, result in again.items():
        assert result.to_json() == first[ask].to_json()
    with pytest.raises(AssertionError, match="run again"):  # a training not finished: trained
        recipe.run_dcm(model, tok, ASKS[:1], plan, finished=lambda a, s: saved.get((a, s)) if s == 0 else None)


def test_asks_for_each_group_and_desideratum():
    circuit = Circuit(
        {"a": [(1, 3), (0, 2)], "b": [(0, 1)], "c": []},
        {"a": "last", "b": ("labels+1", "labels+2"), "c": "query_label"},
    )
    asks = recipe.asks_for(circuit, {"a": ("positional", "object_value"), "b": ("positional",)})
    assert asks == [
        ("a", recipe.Ask(((0, 2), (1, 3)), "last", "positional")),
        ("a", recipe.Ask(((0, 2), (1, 3)), "last", "object_value")),
        ("b", recipe.Ask(((0, 1),), ("labels+1", "labels+2"), "positional")),
    ]
