"""The sweep's marking and `smallest` on hand-written layer scores: a position is marked when
its largest |layer score| is at least `mark` times the largest of all (and not zero); a marked
position set is dropped exactly when another marked one covers a strict subset of its positions
in every prompt with at least `keep` of its effect."""

from __future__ import annotations

import torch

from et_circuits.core.prompts import PromptSet
from et_circuits.methods import sweep as sweep_module
from et_circuits.methods.sweep import Sweep, smallest

# Two prompts of 7 tokens; "pair" is {2, 4} in the first and {1, 3} in the second.
PROMPTS = PromptSet(
    torch.ones(2, 7, dtype=torch.long),
    torch.zeros(2, dtype=torch.long),
    positions={
        "one": torch.tensor([2, 1]),
        "other": torch.tensor([4, 5]),  # in "pair" for the first prompt only
        "pair": torch.tensor([[2, 4], [1, 3]]),
        "twin": torch.tensor([[2, 4], [1, 3]]),  # the same sets as "pair"
    },
)


def _sweep(strengths: dict[str, float], marked: list[str]) -> Sweep:
    """A sweep whose largest |layer score| per position is `strengths` (the sign must not matter)."""
    names = list(strengths)
    layers = torch.tensor([[0.1 * s, -s, 0.0] for s in strengths.values()])
    return Sweep(names, layers, marked)


def test_a_set_is_dropped_for_a_strong_enough_subset():
    found = _sweep({"one": 0.95, "pair": 1.0, "other": 0.3}, ["one", "pair", "other"])
    assert smallest(found, PROMPTS) == ["one", "other"]  # 0.95 >= 0.9 * 1.0
    assert smallest(found, PROMPTS, keep=0.96) == ["one", "pair", "other"]


def test_a_set_stays_for_a_weak_subset_or_one_not_marked():
    weak = _sweep({"one": 0.85, "pair": 1.0}, ["one", "pair"])
    assert smallest(weak, PROMPTS) == ["one", "pair"]  # 0.85 < 0.9
    assert smallest(_sweep({"one": 2.0, "pair": 1.0}, ["pair"]), PROMPTS) == ["pair"]  # "one" not marked


def test_no_subset_in_every_prompt_or_an_equal_set_drops_nothing():
    """ "other" is inside "pair" in one prompt only; "twin" covers "pair" but not strictly."""
    found = _sweep({"other": 1.0, "pair": 1.0, "twin": 1.0}, ["pair", "other", "twin"])
    assert smallest(found, PROMPTS) == ["pair", "other", "twin"]


def _marked(tiny, monkeypatch, strengths: dict[str, float], mark: float) -> list[str]:
    """The positions `sweep` marks when its layer scores are hand-written: per position, one
    layer at `strength` (the sign must not matter) and the others at a tenth of it."""
    model, _ = tiny
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    calls = []

    def sharded_map(one, specs, done):
        calls.append(list(specs))
        if len(calls) == 1:  # the layer sweep: hand-written
            return [torch.tensor([-strengths[s]] + [strengths[s] / 10] * (n_layers - 1)) for s in specs]
        return [torch.zeros(n_layers * n_heads) for _ in specs]

    monkeypatch.setattr(sweep_module, "sharded_map", sharded_map)
    monkeypatch.setattr(sweep_module, "prepare_runs", lambda *a, **k: None)
    monkeypatch.setattr(sweep_module, "path_patch", lambda *a, **k: type("R", (), {"scores": None})())
    prompts = PromptSet(
        torch.ones(2, 7, dtype=torch.long),
        torch.zeros(2, dtype=torch.long),
        positions={name: torch.tensor([i + 1, i + 1]) for i, name in enumerate(strengths)},
    )
    found = sweep_module.sweep(model, prompts, prompts, list(strengths), mark=mark)
    assert calls[0] == list(strengths)
    return found.marked


def test_sweep_marks_positions_at_least_mark_times_the_largest(tiny, monkeypatch):
    strengths = {"a": 1.0, "b": 0.25, "c": 0.15, "d": 0.0}
    assert _marked(tiny, monkeypatch, strengths, 0.2) == ["a", "b"]
    assert _marked(tiny, monkeypatch, strengths, 0.15) == ["a", "b", "c"]  # at the bound: marked
    assert _marked(tiny, monkeypatch, strengths, 1.0) == ["a"]
    assert _marked(tiny, monkeypatch, {"a": 0.0, "b": 0.0}, 0.5) == []  # no effect: nothing marked
