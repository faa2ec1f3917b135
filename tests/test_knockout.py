"""Attention knockout: the blocking hook, edge positions, the layer-resuming evaluation, the CLI."""

import pandas as pd
import pytest
import torch

from et_circuits import models
from et_circuits.core import metrics
from et_circuits.methods import knockout
from et_circuits.pipeline import cli
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.core.errors import DataError
from et_circuits.core.restart import clean_run, run_suffix as resume
from et_circuits.core.settings import RunSettings
from tests.conftest import make_checkpoint
from et_circuits.core.forward import measure

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
        logits = resume(model, run, layer, start)
        assert logits.shape[1] == ids.shape[1] - start
        torch.testing.assert_close(logits, run.logits[:, start:], atol=1e-5, rtol=0)


def test_block_hook_zeroes_exactly_the_edge_from_layer_L(tiny, batch):
    model = tiny[0]
    queries, keys = edge_positions(batch, "last->object")
    hooks = knockout.block_hooks(queries, keys, [1])
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


def test_keys_must_precede_queries(batch):
    with pytest.raises(DataError, match="before its query"):
        knockout.block_hooks(batch.position("query_label"), batch.position("last"), [0])


def test_knockout_accuracy_matches_full_forward_reference(tiny, batch):
    """Chunked, layer-resuming curves equal blocking in plain full forward passes."""
    model = tiny[0]
    full, curves = knockout.knockout(model, batch, recipe.EDGES, RunSettings(batch_size=8, progress=False))
    assert full == 1.0
    assert set(curves) == set(EDGES) and all(len(c) == 2 for c in curves.values())
    for edge, accs in curves.items():
        queries, keys = edge_positions(batch, edge)
        for layer, acc in enumerate(accs):
            hooks = knockout.block_hooks(queries, keys, range(layer, 2))
            expected = measure(model, batch, hooks_for=lambda chunk: hooks, settings=RunSettings(batch_size=len(batch), progress=False))
            assert acc == pytest.approx(expected, abs=1e-6), (edge, layer)
    assert min(min(c) for c in curves.values()) < 1.0  # some knockout changes answers


@pytest.fixture
def organism_env(tiny_dir, monkeypatch):
    monkeypatch.setenv("ET_CIRCUITS_ORGANISM_LLAMA", str(tiny_dir))
    saved = []
    monkeypatch.setattr("et_circuits.figures.save_figures", lambda todo, directory: saved.extend((fig, stem) for stem, fig in todo))
    return saved


def test_cli_writes_curves(organism_env, tmp_path):
    argv = ["knockout", "--model", "organism-llama", "--results", str(tmp_path), "--n", "10",
            "--boxes", "3", "--device", "cpu"]
    assert cli.main(argv) == 0
    frame = pd.read_csv(tmp_path / "knockout.csv")
    assert len(frame) == len(recipe.EDGES) * 2
    assert list(frame.columns) == ["model", "edge", "from_layer", "accuracy", "full_accuracy", "n"]
    assert set(frame["from_layer"]) == {0, 1} and (frame["model"] == "organism-llama").all()
    assert [stem for _, stem in organism_env] == ["knockout"]
    assert len(organism_env[0][0].data) == len(recipe.EDGES)
