"""Mean ablation on tiny random checkpoints: cached position means, the fast ablation against a
full forward per row, the complement (F(M \\ C)), and `evaluate_circuit`'s `Evaluation`."""

from __future__ import annotations

import json

import pytest
import torch

from et_circuits import models
from et_circuits.core.circuit import Circuit
from et_circuits.core.settings import RunSettings
from et_circuits.methods import evaluation
from et_circuits.methods.evaluation import (
    Evaluation,
    ablated_accuracies,
    ablated_accuracy,
    ablated_last_logits,
    evaluate_circuit,
    position_means,
)
from et_circuits.tasks.entity_tracking import data
from et_circuits.tasks.entity_tracking.paper import paper_circuit


def test_position_means_cache(tiny_dir, vocab, tmp_path, monkeypatch):
    """Cached means equal fresh ones; a second call reads the file; other weights, other
    prompts or another batch size get their own file."""
    model, tok, _ = models.load(tiny_dir, device="cpu")
    reference = data.make_prompts(tok, data.sample_prompts(vocab, 10, 7, 12))
    four = RunSettings(batch_size=4)
    fresh = position_means(model, reference, settings=four)
    cached = position_means(model, reference, settings=four, cache_dir=tmp_path)
    assert torch.equal(cached, fresh) and len(list(tmp_path.glob("means-*.safetensors"))) == 1

    def no_forward(*a, **k):
        raise AssertionError("the cached means were recomputed")

    monkeypatch.setattr(evaluation, "mean_activations", no_forward)
    assert torch.equal(position_means(model, reference, settings=four, cache_dir=tmp_path), fresh)
    monkeypatch.undo()
    other = data.make_prompts(tok, data.sample_prompts(vocab, 10, 7, 13))
    position_means(model, other, settings=four, cache_dir=tmp_path)
    position_means(model, reference, settings=RunSettings(batch_size=5), cache_dir=tmp_path)
    with torch.no_grad():
        model.blocks[0].attn.W_O[0, 0, 0] += 1.0  # layer 1 reads it
    changed = position_means(model, reference, settings=four, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("means-*.safetensors"))) == 4
    assert not torch.equal(changed, fresh)


@pytest.mark.parametrize("ablate_circuit", [False, True])
def test_fast_ablation_equals_the_full_forwards(predicted, ablate_circuit):
    """Restarting each row from the shared run at its first kept position gives the logits of
    a full forward per row (circuits at single positions, at position sets, and empty ones)."""
    model, batch, means = predicted
    circuits = [
        paper_circuit({"value_fetcher": [(1, 0), (0, 2)], "pos_transmitter": [(0, 1)]}),  # paper positions
        Circuit(
            {"binder": [(0, 0), (0, 3)], "value_fetcher": [(1, 1)]},
            {"binder": ["labels+1", "labels+2"], "value_fetcher": "last"},
        ),
        Circuit({"value_fetcher": [(1, 2)]}, {"value_fetcher": "query_label"}),
        Circuit({}),
    ]
    settings = RunSettings(batch_size=5, max_rows=12)  # several passes, some of one prompt
    got = {m: torch.zeros(len(circuits), len(batch), model.cfg.d_vocab) for m in evaluation.ABLATION_METHODS}
    for m in got:
        for which, row, logits in ablated_last_logits(
            model, circuits, batch, means, settings=settings, ablate_circuit=ablate_circuit, method=m
        ):
            got[m][which, row] = logits.float()
    assert got["fast"].abs().amax((1, 2)).min() > 0  # every row was written
    torch.testing.assert_close(got["fast"], got["reference"], atol=1e-4, rtol=1e-4)
    assert (got["reference"][0] - got["reference"][1]).abs().max() > 1e-2  # the circuits differ
    options = dict(settings=settings, ablate_circuit=ablate_circuit)
    assert ablated_accuracies(model, circuits, batch, means, **options) == ablated_accuracies(
        model, circuits, batch, means, **options, method="reference"
    )


def test_model_without_ablates_the_heads(predicted):
    model, batch, means = predicted
    assert ablated_accuracy(model, Circuit({}), batch, means, ablate_circuit=True) == 1.0
    everything = paper_circuit({"value_fetcher": [(l, h) for l in range(2) for h in range(4)]})
    assert ablated_accuracy(model, everything, batch, means, ablate_circuit=True) < 1.0


# ---------------------------------------------------------------------------------------------
# Evaluation, the result type


@pytest.fixture(scope="module")
def evaluated(predicted, tiny, vocab):
    """A real `evaluate_circuit` on the predicted prompts (full accuracy 1)."""
    model, batch, means = predicted
    circuit = paper_circuit({"value_fetcher": [(1, 0), (1, 2)], "pos_detector": [(0, 1)]})
    reference = data.make_prompts(tiny[1], data.sample_prompts(vocab, 24, 7, 12))  # the means' prompts
    return circuit, evaluate_circuit(model, circuit, batch, reference, n_random=3, seed=1, means=means)


def test_evaluation_is_the_ablated_scores(predicted, evaluated):
    """The numbers are F of the full model, of the circuit and of the random circuits; the
    given means are the means of the reference prompts."""
    model, batch, means = predicted
    circuit, ev = evaluated
    assert (ev.metric, ev.n_random, ev.n) == ("accuracy", 3, len(batch))
    assert ev.full == 1.0 and ev.faithfulness == pytest.approx(ev.circuit / ev.full)
    assert ev.circuit == ablated_accuracy(model, circuit, batch, means)
    assert 0 <= ev.random <= 1 and 0 < ev.slots < 1
    again = evaluate_circuit(model, circuit, batch, batch, n_random=3, seed=1, means=means)
    assert again == ev  # seeded, and `means` is what was used (the reference given is ignored)


def test_evaluation_round_trips_through_json(evaluated):
    _, ev = evaluated
    back = Evaluation.from_json(json.loads(json.dumps(ev.to_json())))
    assert back == ev and isinstance(back.full, float)


def test_evaluation_frame_and_repr(evaluated):
    _, ev = evaluated
    frame = ev.to_frame()
    assert list(frame.columns) == ["full", "circuit", "random", "faithfulness", "slots", "metric", "n"]
    assert len(frame) == 1 and frame.iloc[0]["n"] == ev.n and frame.iloc[0]["circuit"] == round(ev.circuit, 4)
    text = repr(ev)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert f"circuit={ev.circuit:.3f}" in text and f"random={ev.random:.3f}" in text and f"slots={ev.slots:.3f}" in text
