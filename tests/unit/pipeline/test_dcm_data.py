"""The dcm stage draws DCM's pairs apart from every other prompt set of the run: with the same
--seed, no DCM base prompt is a prompt of path patching, minimality, the ablation means, Table 1,
CMAP or knockout."""

from __future__ import annotations

import pytest

from et_circuits.core.circuit import Circuit
from et_circuits.pipeline import cli, results, running
from et_circuits.tasks.entity_tracking import data, desiderata, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS


class Reached(Exception):
    pass


@pytest.mark.parametrize("seed", [0, 3])
def test_dcm_pairs_share_no_prompt_with_the_other_sets(tiny, tmp_path, monkeypatch, seed):
    model, tok = tiny
    monkeypatch.setattr(running.models, "load", lambda *a, **k: (model, tok, None))
    plans = []
    monkeypatch.setattr(
        recipe, "run_dcm", lambda m, t, asks, plan, **k: plans.append(plan) or (_ for _ in ()).throw(Reached)
    )
    circuit = Circuit({s.group: [(1, 0)] for s in PAPER_STEPS}, {s.group: s.position for s in PAPER_STEPS})
    path = results.circuit_path(tmp_path, "m", "paper")
    path.parent.mkdir(parents=True)
    circuit.save(path)
    argv = ["dcm", "--models", "m", "--base", "m", "--results", str(tmp_path), "--seed", str(seed), "--boxes", "3"]
    with pytest.raises(Reached):
        cli.main([*argv, "--n-train", "20", "--n-eval", "10", "--n-test", "10", "--device", "cpu"])
    (plan,) = plans
    vocab = data.vocabulary(tok, min_objects=3, min_labels=3)
    bases = set(desiderata.draw_bases(vocab, sum(plan.sizes), 3, plan.data_seed))
    for purpose, offset in recipe.SEED_OFFSETS.items():
        if purpose != "dcm":
            others = set(data.sample_prompts(vocab, 40, 3, seed + offset))
            assert not bases & others, f"DCM's pairs share prompts with the {purpose} prompts"
