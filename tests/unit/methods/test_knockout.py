"""Attention knockout: the blocking hook, edge positions, the layer-resuming evaluation and the
`Knockout` result type (the CLI stage: tests/integration/test_cmap_knockout_stages.py)."""

import json

import pytest
import torch

from et_circuits import models
from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import DataError
from et_circuits.core.forward import measure
from et_circuits.core.hooks import block_hooks
from et_circuits.core.restart import clean_run, run_suffix
from et_circuits.core.settings import RunSettings
from et_circuits.methods import knockout
from et_circuits.tasks.entity_tracking import data, recipe
from tests.conftest import make_checkpoint

EDGES = {e.name: e for e in recipe.EDGES}


@pytest.fixture(scope="module")
def batch(tiny, vocab):
    """Prompts whose answers are the tiny model's own predictions (full accuracy 1), so that
    knocking out an edge visibly changes accuracy; with the knockout's random control."""
    model, tok = tiny
    b = recipe.with_random_context(data.make_prompts(tok, data.sample_prompts(vocab, 30, 3, seed=2)), 4)
    with torch.no_grad():
        pred = model(b.input_ids)[torch.arange(len(b)), b.position("last")].argmax(-1)
    return b.replace(answers=pred)


def edge_positions(prompts, name):
    return prompts.position(EDGES[name].query), prompts.position(EDGES[name].key)


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_resume_equals_the_full_forward(tmp_path, vocab, n_kv_heads):
    """Restarting at (layer, position) from a clean run's residual and keys/values reproduces
    the clean logits of those positions (the shortcut knockout and CMAP rely on)."""
    make_checkpoint(tmp_path, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads)
    model, tok, _ = models.load(tmp_path, device="cpu")
    ids = data.make_prompts(tok, data.sample_prompts(vocab, 5, 3, seed=3)).input_ids
    run = clean_run(model, ids)
    for layer, start in [(0, 0), (1, 7), (2, ids.shape[1] - 1)]:
        logits = run_suffix(model, run, layer, start)
        assert logits.shape[1] == ids.shape[1] - start
        torch.testing.assert_close(logits, run.logits[:, start:], atol=1e-5, rtol=0)


def test_block_hook_zeroes_exactly_the_edge_from_layer_L(tiny, batch):
    model = tiny[0]
    queries, keys = edge_positions(batch, "last->object")
    hooks = block_hooks(queries, keys, [1])
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in (0, 1)]
    with torch.no_grad():
        _, clean = model.run_with_cache(batch.input_ids, names_filter=lambda n: n in names)
        with model.hooks(fwd_hooks=hooks):
            _, blocked = model.run_with_cache(batch.input_ids, names_filter=lambda n: n in names)
    rows = torch.arange(len(batch))
    torch.testing.assert_close(blocked[names[0]], clean[names[0]])  # layer 0 untouched
    pattern = blocked[names[1]]
    assert (pattern[rows, :, queries, keys] == 0).all()
    assert (clean[names[1]][rows, :, queries, keys] > 0).all()
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))  # still a distribution
    # other query positions of layer 1 keep their attention
    other = queries - 1
    torch.testing.assert_close(pattern[rows, :, other], clean[names[1]][rows, :, other])


def test_edge_positions_point_at_the_right_tokens(tiny, vocab):
    tok = tiny[1]
    samples = data.sample_prompts(vocab, 30, 3, seed=2)
    batch = data.make_prompts(tok, samples)
    q, k = edge_positions(batch, "last->object")
    for b, sample in enumerate(samples):
        assert q[b] == batch.position("last")[b]
        assert tok.convert_ids_to_tokens(int(batch.input_ids[b, k[b]])) == sample.answer
    q, k = edge_positions(batch, "query_label->prev_query_label")
    assert (batch.input_ids[torch.arange(len(batch)), q] == batch.input_ids[torch.arange(len(batch)), k]).all()
    assert (k < q).all()
    with pytest.raises(DataError, match="unknown position"):
        batch.position("bos")


def test_random_control_avoids_the_tested_tokens_and_is_seeded(batch):
    k = batch.position("random_context")
    assert (k >= 1).all() and (k != batch.position("answer_object")).all()
    assert (k != batch.position("prev_query_label")).all()
    assert (k < batch.position("query_label") - 1).all()  # inside the context, before the query
    assert torch.equal(k, recipe.with_random_context(batch, 4).position("random_context"))
    assert not torch.equal(k, recipe.with_random_context(batch, 1).position("random_context"))


def test_edges_to_a_discovered_circuit_skip_position_sets(batch):
    """Knockout blocks one key per prompt, so a discovered group acting at every label's next
    token ("labels+1", as a random Qwen3 pair's discovery found) gets no edge."""
    discovered = Circuit(
        {"A": [(1, 0)], "B": [(0, 1)], "C": [(0, 2)], "D": [(0, 3)]},
        {"A": "last", "B": "query_label", "C": "labels+1", "D": ("query_label", "prev_query_label")},
    )
    assert [e.key for e in recipe.edges_to(discovered, batch)] == ["query_label", "prev_query_label"]


def test_keys_must_precede_queries(batch):
    with pytest.raises(DataError, match="before its query"):
        block_hooks(batch.position("query_label"), batch.position("last"), [0])


def test_knockout_accuracy_matches_full_forward_reference(tiny, batch):
    """Chunked, layer-resuming curves equal blocking in plain full forward passes."""
    model = tiny[0]
    result = knockout.knockout(model, batch, recipe.EDGES, settings=RunSettings(batch_size=8, progress=False))
    full, curves = result.full, result.curves
    assert full == 1.0 and result.n == len(batch) and result.metric == "accuracy"
    assert set(curves) == set(EDGES) and all(len(c) == 2 for c in curves.values())
    for edge, accs in curves.items():
        queries, keys = edge_positions(batch, edge)
        for layer, acc in enumerate(accs):
            hooks = block_hooks(queries, keys, range(layer, 2))
            expected = measure(
                model,
                batch,
                hooks_for=lambda chunk, hooks=hooks: hooks,
                settings=RunSettings(batch_size=len(batch), progress=False),
            )
            assert acc == pytest.approx(expected, abs=1e-6), (edge, layer)
    assert min(min(c) for c in curves.values()) < 1.0  # some knockout changes answers


# ---------------------------------------------------------------------------------------------
# The result type


@pytest.fixture(scope="module")
def result(tiny, batch):
    """A real `Knockout`: the paper's edges on the tiny model's own answers."""
    return knockout.knockout(tiny[0], batch, recipe.EDGES, settings=RunSettings(batch_size=8, progress=False))


def test_knockout_json_round_trip(result):
    d = result.to_json()
    back = knockout.Knockout.from_json(json.loads(json.dumps(d)))
    assert back.to_json() == d
    assert back == result  # a frozen dataclass of plain values: equal field by field
    assert min(min(c) for c in back.curves.values()) < back.full  # not all the same number


def test_knockout_frame(result):
    frame = result.to_frame()
    assert list(frame.columns) == ["edge", "from_layer", "value", "full"]
    assert len(frame) == len(recipe.EDGES) * 2  # one row per (edge, first blocked layer)
    for row in frame.itertuples():
        assert row.value == result.curves[row.edge][row.from_layer] and row.full == result.full
    assert list(dict.fromkeys(frame["edge"])) == [e.name for e in recipe.EDGES]


def test_knockout_repr(result):
    text = repr(result)
    assert "\n" not in text and len(text) < 300 and "tensor" not in text
    assert text.startswith(f"Knockout(accuracy {result.full:.3f} unblocked, n=30; lowest when blocked: ")
    for edge, values in result.curves.items():  # each edge's lowest value and the layer it is reached from
        layer = min(range(len(values)), key=values.__getitem__)
        assert f"{edge} {values[layer]:.3f} (from L{layer})" in text
    assert all(repr(x) not in text for v in result.curves.values() for x in v if round(x, 3) != x)
