"""The recipe's protocol choices, each checked against a plain reading of the paper: Table 1's
ablation means are taken over the reference prompts (not the evaluated ones), minimality and
completeness score on their own prompts, a discovered step's receivers are the earlier group it
names, and DCM's train, selection and test pairs never share a base prompt."""

from __future__ import annotations

import torch

from et_circuits.core.circuit import Circuit
from et_circuits.core.types import Receiver
from et_circuits.methods import dcm as dcm_method
from et_circuits.methods import discovery
from et_circuits.methods import path_patching as pp
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from et_circuits.tasks.entity_tracking.recipe import circuits as recipe_circuits

CIRCUIT = Circuit(
    {"value_fetcher": [(1, 2)], "pos_transmitter": [(0, 1)]}, {"value_fetcher": "last", "pos_transmitter": "last"}
)


def _oracle_means(model, prompts) -> torch.Tensor:
    """Every head's hook_z averaged over the prompts, position by position: [layer, pos, head, d]."""
    _, cache = model.run_with_cache(prompts.input_ids)
    return torch.stack([cache[f"blocks.{l}.attn.hook_z"].mean(0) for l in range(model.cfg.n_layers)])


def _rows(prompts) -> set[tuple[int, ...]]:
    """Each prompt's real tokens."""
    return {tuple(ids[mask.bool()].tolist()) for ids, mask in zip(prompts.input_ids, prompts.attention_mask)}


def test_table1_means_are_over_the_reference_prompts(tiny, monkeypatch):
    """table1_row evaluates its own seeded evaluation prompts with means over the seeded
    reference prompts (compared with the oracle's means), and the two sets share no prompt."""
    model, tok = tiny
    plan = recipe.CircuitPlan(n_boxes=3, seed=4, reference_n=6, evaluation_n=5, n_random=1)
    seen = {}
    monkeypatch.setattr(recipe_circuits, "evaluate_circuit", lambda *a, **k: seen.update(args=a, kwargs=k))
    recipe.table1_row(model, tok, CIRCUIT, plan)
    _, circuit, batch, reference = seen["args"]
    vocab = data.vocabulary(tok, min_objects=3, min_labels=3)
    offsets = recipe.SEED_OFFSETS
    expected_reference = recipe.prompts(tok, vocab, 6, 3, 4 + offsets["reference"])
    expected_batch = recipe.prompts(tok, vocab, 5, 3, 4 + offsets["evaluation"])
    assert circuit is CIRCUIT
    assert torch.equal(reference.input_ids, expected_reference.input_ids)
    assert torch.equal(batch.input_ids, expected_batch.input_ids)
    assert not _rows(batch) & _rows(reference)
    torch.testing.assert_close(seen["kwargs"]["means"], _oracle_means(model, expected_reference), atol=1e-5, rtol=1e-4)
    assert (seen["kwargs"]["n_random"], seen["kwargs"]["seed"]) == (1, 4)


def test_minimality_and_completeness_score_on_their_own_prompts(tiny, monkeypatch):
    """discover prunes and measures completeness on the seeded minimality prompts, ablating
    with means over the reference prompts; neither set is the path-patching one."""
    model, tok = tiny
    plan = recipe.CircuitPlan(n=4, n_boxes=3, seed=2, minimality_n=5, reference_n=6, completeness_random=1)
    seen = {}

    def minimal(circuit, score, **kwargs):
        seen["minimality"] = score.keywords
        return type("Pruned", (), {"circuit": circuit})()

    monkeypatch.setattr(recipe_circuits, "minimal", minimal)
    monkeypatch.setattr(
        recipe_circuits, "completeness", lambda m, c, prompts, means, **k: seen.update(c=(prompts, means), ck=k)
    )
    recipe.discover(model, tok, "paper", plan)
    vocab = data.vocabulary(tok, min_objects=3, min_labels=4)
    offsets = recipe.SEED_OFFSETS
    batch = recipe.prompts(tok, vocab, 5, 3, 2 + offsets["minimality"])
    reference = recipe.prompts(tok, vocab, 6, 3, 2 + offsets["reference"])
    clean, _ = recipe.path_patching_prompts(tok, vocab, 4, 3, 2 + offsets["path_patching"])
    means = _oracle_means(model, reference)
    for prompts, used_means in ((seen["minimality"]["prompts"], seen["minimality"]["means"]), seen["c"]):
        assert torch.equal(prompts.input_ids, batch.input_ids)
        torch.testing.assert_close(used_means, means, atol=1e-5, rtol=1e-4)
    assert not _rows(batch) & _rows(clean) and not _rows(batch) & _rows(reference)
    assert (seen["ck"]["n_random"], seen["ck"]["seed"]) == (1, 2)  # the plan's random sets and seed


def test_discovered_steps_take_the_first_top_k_numbers(tiny, monkeypatch):
    """At discovered positions (two steps at the last token and a binder group), the steps
    take the plan's first three top-k numbers, in order; the paper's reading all four."""
    model, tok = tiny
    asked = []

    def find_circuit(model, clean, corrupt, top_k, steps, **kwargs):
        asked.append((tuple(top_k), [s.group for s in steps]))
        raise StopIteration

    monkeypatch.setattr(recipe_circuits, "find_circuit", find_circuit)
    monkeypatch.setattr(recipe_circuits, "sweep", lambda *a, **k: None)
    monkeypatch.setattr(recipe_circuits, "smallest", lambda found, prompts: ["query_label", "last"])
    plan = recipe.CircuitPlan(n=4, n_boxes=3, top_k=(1, 2, 3, 4), top_k_cap=1.0, sweep_n=4)
    for reading in ("discovered", "paper"):
        try:
            recipe.discover(model, tok, reading, plan)
        except StopIteration:
            pass
    assert asked == [
        ((1, 2, 3), ["value_fetcher", "pos_transmitter", "binder"]),
        ((1, 2, 3, 4), [s.group for s in PAPER_STEPS]),
    ]


def test_discovered_steps_receive_from_the_groups_the_paper_names(tiny, vocab, monkeypatch):
    """At discovered positions: A on the logits, B through A's queries at the last token, and
    the binder group through A's keys and values at its own position (not B's)."""
    model, tok = tiny
    received = []

    def fake(model, clean, corrupt, position, *, receivers=None, **kwargs):
        received.append((position, list(receivers or [])))
        scores = torch.arange(model.cfg.n_layers * model.cfg.n_heads, dtype=torch.float32).neg()
        return pp.PathPatching(scores.reshape(model.cfg.n_layers, -1), position, tuple(receivers or ()))

    monkeypatch.setattr(discovery, "path_patch", fake)
    monkeypatch.setattr(discovery, "prepare_runs", lambda *a, **k: None)
    steps = recipe.own_steps(("query_label", "last"))
    assert [s.group for s in steps] == [PAPER_STEPS[0].group, PAPER_STEPS[1].group, "binder"]
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, 3, 3, seed=0)
    found = discovery.find_circuit(model, clean, corrupt, (2, 2, 2), steps)
    a = found.circuit.groups["value_fetcher"]
    assert len(a) == 2 and a != found.circuit.groups["pos_transmitter"]
    assert received == [
        ("last", []),
        ("last", [Receiver(l, h, "q", "last") for l, h in a]),
        ("query_label", [Receiver(l, h, k, "query_label") for k in "kv" for l, h in a]),
    ]
    assert steps[2].position == "query_label" and steps[2].receivers_from == "value_fetcher"
    two = recipe.own_steps(("objects+1", "query_label", "last"))[2]
    assert two.position == ("objects+1", "query_label")
    assert recipe.own_steps(("last",)) == tuple(PAPER_STEPS[:2])


def test_dcm_splits_are_disjoint_and_seeded(tiny, monkeypatch):
    """The pairs run_dcm hands DCM: n_train + n_eval fit pairs and n_test test pairs, no base
    prompt twice in the fit pairs nor in both fit and test; the same data seed gives the same
    pairs, another seed others."""
    model, tok = tiny
    asked = []

    def dcm_many(model, questions, **kwargs):
        asked.append((questions, kwargs))
        raise StopIteration

    monkeypatch.setattr(dcm_method, "dcm_many", dcm_many)
    ask = recipe.Ask(((1, 0),), "last", "positional")
    for data_seed in (3, 3, 4):
        plan = recipe.DCMPlan(dcm_method.DCMConfig(), (6, 4, 5), 3, data_seed=data_seed, seeds=(0,))
        try:
            recipe.run_dcm(model, tok, [ask], plan)
        except StopIteration:
            pass
    (q,), kwargs = asked[0]
    assert (kwargs["n_train"], kwargs["n_eval"]) == (6, 4)
    fit, test = _rows(q.fit.base), _rows(q.test.base)
    assert len(fit) == len(q.fit.base) == 10 and len(test) == len(q.test.base) == 5
    assert not fit & test
    again, other = asked[1][0][0], asked[2][0][0]
    assert torch.equal(again.fit.base.input_ids, q.fit.base.input_ids)
    assert not torch.equal(other.fit.base.input_ids, q.fit.base.input_ids)
