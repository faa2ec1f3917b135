"""Impossible input to the methods is refused with the project's errors, never a wrong number or
a raw IndexError: token ids outside the vocabulary, a negative top-k, ablation means of another
layout; senders that cannot reach anything are warned about."""

from __future__ import annotations

import pytest
import torch

import et_circuits as et
from et_circuits.core.errors import CircuitError, DataError
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import paper_circuit

Q = et.RunSettings(batch_size=8, progress=False)


@pytest.fixture(scope="module")
def pair(tiny, vocab):
    return recipe.path_patching_prompts(tiny[1], vocab, 8, 7, seed=1)


def test_an_answer_outside_the_vocabulary_is_refused(tiny, pair):
    model, _ = tiny
    clean, corrupt = pair
    bad = clean.replace(answers=torch.full((len(clean),), model.cfg.d_vocab + 3))
    with pytest.raises(DataError, match=f"token id {model.cfg.d_vocab + 3} in answers"):
        et.measure(model, bad)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        et.path_patch(model, bad, corrupt.replace(answers=bad.answers), "last", settings=Q)


def test_an_input_id_outside_the_vocabulary_is_refused(tiny, pair):
    model, _ = tiny
    clean, corrupt = pair
    ids = clean.input_ids.clone()
    ids[0, 3] = model.cfg.d_vocab
    bad = clean.replace(input_ids=ids)
    for call in (
        lambda: et.measure(model, bad),
        lambda: et.knockout(model, bad, [et.Edge("e", "last", "query_label")], settings=Q),
        lambda: et.sweep(model, bad, corrupt, ["last"], settings=Q),
    ):
        with pytest.raises(DataError, match="in input_ids is outside the model's vocabulary"):
            call()


def test_top_k_must_not_be_negative(tiny, pair):
    scores = et.path_patch(tiny[0], *pair, "last", settings=Q)
    assert et.top_heads(scores, 0) == []
    with pytest.raises(CircuitError, match="got -1"):
        et.top_heads(scores, -1)


def test_ablation_means_of_another_layout_are_refused(tiny, vocab):
    model, tok = tiny
    prompts = data.make_prompts(tok, data.sample_prompts(vocab, 8, 5, seed=0))
    longer = data.make_prompts(tok, data.sample_prompts(vocab, 8, 7, seed=1))  # 7 boxes: a longer layout
    circuit = paper_circuit({"value_fetcher": [(1, 0)]})
    with pytest.raises(DataError, match="prompts' layout"):
        et.evaluate_circuit(model, circuit, prompts, longer, n_random=2, settings=Q)


def test_senders_that_reach_nothing_are_warned_about(tiny, pair):
    model, _ = tiny
    clean, corrupt = pair
    # Senders at the last token, receivers at the query label before it: causal attention
    # carries nothing back, so every score is 0; the method says so.
    receivers = [et.Receiver(1, h, "v", "query_label") for h in range(4)]
    with pytest.warns(UserWarning, match="come after every receiver in every prompt"):
        result = et.path_patch(model, clean, corrupt, "last", receivers=receivers, settings=Q)
    assert torch.equal(result.scores, torch.zeros_like(result.scores))
