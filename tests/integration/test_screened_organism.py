"""Screened discovery on the organism: attribution for every sender, exact path patching for the
N = 2 x top-k it ranks first, gives exactly the groups of exact discovery, for the four organism
models in both readings (the paper's positions and the positions a sweep marks), on the
circuit stage's prompts (300, seed 0)."""

from __future__ import annotations

import pytest
import torch

from et_circuits import models
from et_circuits.core.settings import RunSettings
from et_circuits.methods import discovery
from et_circuits.methods.sweep import smallest, sweep
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS

S = RunSettings(progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["organism-llama", "organism-vicuna", "organism-goat", "organism-float"])
def test_screened_discovery_finds_the_exact_circuit(name):
    model, tok, _ = models.load(name, device="cpu")
    plan = recipe.CircuitPlan()
    top_k = discovery.effective_top_k(plan.top_k, model.cfg.n_layers, model.cfg.n_heads, plan.top_k_cap)
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), plan.n, 7, seed=0)
    few = slice(0, plan.sweep_n)
    marked = sweep(model, clean[few], corrupt[few], recipe.SWEEP_POSITIONS, mark=plan.mark, settings=S)
    for steps in (PAPER_STEPS, recipe.own_steps(smallest(marked, clean[few]))):
        k = top_k[: len(steps)]
        screen = 2 * max(k)
        exact = discovery.find_circuit(model, clean, corrupt, k, steps, settings=S)
        screened = discovery.find_circuit(model, clean, corrupt, k, steps, screen=screen, settings=S)
        assert screened.circuit == exact.circuit
        assert sum(len(heads) for heads in exact.circuit.groups.values()) > 0
        for group, result in screened.scores.items():  # the chosen heads were scored exactly, with the exact scores
            scored = ~result.scores.isnan()
            assert int(scored.sum()) <= screen
            torch.testing.assert_close(result.scores[scored], exact.scores[group].scores[scored], atol=1e-6, rtol=0)
