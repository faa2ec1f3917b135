"""The entity-tracking recipe's circuit discovery: its path-patching prompts are seeded and
aligned, and the paper's four steps on organism-llama reproduce the scores of the code that the
task-neutral refactor replaced (committed under tests/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from et_circuits import models
from et_circuits.core.settings import RunSettings
from et_circuits.methods import discovery
from et_circuits.methods import path_patching as pp
from et_circuits.pipeline.results import load_scores
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "organism-llama-path-patching"


def test_prompts_are_seeded_and_aligned(tiny, vocab):
    _, tok = tiny
    a_clean, a_corrupt = recipe.path_patching_prompts(tok, vocab, 12, 7, seed=5)
    b_clean, _ = recipe.path_patching_prompts(tok, vocab, 12, 7, seed=5)
    c_clean, _ = recipe.path_patching_prompts(tok, vocab, 12, 7, seed=6)
    assert torch.equal(a_clean.input_ids, b_clean.input_ids)
    assert not torch.equal(a_clean.input_ids, c_clean.input_ids)
    for name in ("last", "query_label"):
        assert torch.equal(a_clean.position(name), a_corrupt.position(name))
    assert (a_clean.answers != a_corrupt.answers).all()


@pytest.fixture(scope="module")
def organism():
    model, tok, _ = models.load("organism-llama", device="cpu")
    return model, tok


@pytest.mark.slow
def test_organism_recipe_reproduces_the_scores_of_the_replaced_code(organism):
    """The paper's four steps on organism-llama (300 prompts, seed 0, top-k 4 per step: the
    recipe's paper reading with the paper's top-k capped for a 16-head model) give the step A
    and B scores that the code before the task-neutral refactor computed (committed under
    tests/fixtures), and A and B are the heads README reports. Since then a group is chosen only
    among the senders that can reach its receivers: B's among layer 0 (below A's top layer), so
    C's senders reach nothing (all scores 0, no head chosen) and D has no receivers (no score)."""
    model, tok = organism
    plan = recipe.CircuitPlan()
    top_k = discovery.effective_top_k(plan.top_k, model.cfg.n_layers, model.cfg.n_heads, plan.top_k_cap)
    assert top_k == (4, 4, 4, 4)
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), plan.n, 7, seed=0)
    found = discovery.find_circuit(model, clean, corrupt, top_k, PAPER_STEPS, settings=RunSettings(progress=False))
    circuit, scores = found.circuit, {g: r.scores for g, r in found.scores.items()}
    old = {g: load_scores(FIXTURES / f"{g}.safetensors")[0] for g in ("value_fetcher", "pos_transmitter")}
    for group, expected in old.items():
        torch.testing.assert_close(scores[group], expected, atol=1e-6, rtol=0)
    candidates = json.loads((FIXTURES / "minimality.json").read_text())["candidates"]["groups"]
    assert circuit.groups["value_fetcher"] == [tuple(h) for h in candidates["value_fetcher"]]
    assert circuit.groups["value_fetcher"][:3] == [(1, 2), (1, 3), (1, 1)]
    top_a = max(layer for layer, _ in circuit.groups["value_fetcher"])
    among = [(l, h) for l in range(top_a) for h in range(4)]
    assert circuit.groups["pos_transmitter"] == pp.top_heads(old["pos_transmitter"], 4, among=among)
    assert circuit.groups["pos_transmitter"][:2] == [(0, 1), (0, 0)]
    assert (scores["pos_detector"] == 0).all() and circuit.groups["pos_detector"] == []
    assert scores["struct_reader"].isnan().all() and circuit.groups["struct_reader"] == []
