"""DCM on tiny random LLaMAs: the masked forward against independent hook code, the resume fast
path against the full forward, mask training (frozen weights, determinism, a head that is right
by construction), job reuse, and the `dcm` / `dcm-figure` commands."""

import copy
import json

import pytest
import torch

from et_circuits.methods import dcm as dcm
from et_circuits import models
from et_circuits.core.circuit import Circuit
from et_circuits.pipeline.cli import main
from et_circuits.tasks.entity_tracking import data, desiderata, recipe
from et_circuits.pipeline.results import selected_heads
from et_circuits.tasks.entity_tracking.paper import paper_circuit
from tests.conftest import make_checkpoint
from et_circuits.methods.dcm.training import stacked
from et_circuits.methods.dcm.masking import frozen

GROUPS = {  # position (or position set) -> heads of a 2-layer, 4-head model
    "last": [(1, 0), (1, 3), (0, 2)],
    "query_label": [(0, 1), (1, 2)],
    "prev_query_label": [(0, 3)],
    ("prev_query_label+1", "prev_query_label+2"): [(0, 1), (1, 3)],
}



@pytest.fixture(scope="module")
def pairs(tiny, vocab):
    splits = desiderata.draw_splits(data.positional, vocab, (96, 48, 16), 7, seed=0)
    tok = tiny[1]
    return desiderata.tokenize_pairs(tok, splits.train), desiderata.tokenize_pairs(tok, splits.eval)


def _reference_patch(model, pairs, position, heads):
    """Last-token logits of the base with `heads` overwritten at each of the base's `position`s
    by their z in the source at the source's same-numbered position: plain TransformerLens calls."""
    _, cache = model.run_with_cache(pairs.source.input_ids)
    rows = torch.arange(len(pairs))
    specs = (position,) if isinstance(position, str) else position

    def overwrite(act, hook, layer):
        act = act.clone()
        for spec in specs:
            src_pos, base_pos = pairs.source.position(spec), pairs.base.position(spec)
            for l, h in heads:
                if l == layer:
                    act[rows, base_pos, h] = cache[hook.name][rows, src_pos, h]
        return act

    hooks = [(f"blocks.{l}.attn.hook_z", lambda act, hook, l=l: overwrite(act, hook, l)) for l in {l for l, _ in heads}]
    logits = model.run_with_hooks(pairs.base.input_ids, fwd_hooks=hooks)
    return logits[rows, pairs.base.position("last")]


@pytest.mark.parametrize("resume", [False, True], ids=["full", "resume"])
@pytest.mark.parametrize("position", list(GROUPS), ids=str)
def test_mask_ones_is_base_and_zeros_is_patched(tiny, pairs, position, resume):
    model = tiny[0]
    train = pairs[0]
    heads = GROUPS[position]
    d = dcm.prepare_pairs(model, train, position, heads, run=resume)
    assert (d.run is not None) == resume
    with torch.no_grad():
        plain = model(train.base.input_ids)[torch.arange(len(train)), train.base.position("last")]
        ones = dcm.masked_logits(model, heads, torch.ones(len(heads)), d)
        zeros = dcm.masked_logits(model, heads, torch.zeros(len(heads)), d)
        reference = _reference_patch(model, train, position, heads)
    torch.testing.assert_close(ones, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(zeros, reference, atol=1e-5, rtol=0)
    assert (zeros - plain).abs().max() > 1e-4, "the patch must change more than the tolerance"


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_resume_equals_full_forward(tmp_path, vocab, n_kv_heads):
    make_checkpoint(tmp_path, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, d_model=32, seed=3)
    model, tok, _ = models.load(tmp_path, device="cpu")
    cfs = desiderata.draw_splits(desiderata.segment_at_start, vocab, (24, 1, 1), 7, seed=1).train
    t = desiderata.tokenize_pairs(tok, cfs)
    mask = torch.tensor([0.3, 0.9, 0.0])
    for position, heads in [("last", [(2, 1), (1, 3), (2, 0)]), ("prev_query_label", [(0, 2), (2, 3), (1, 1)])]:
        full = dcm.prepare_pairs(model, t, position, heads, run=False)
        fast = dcm.prepare_pairs(model, t, position, heads)
        assert fast.restart == (min(l for l, _ in heads), int(full.position.min()))
        with torch.no_grad():
            torch.testing.assert_close(
                dcm.masked_logits(model, heads, mask, fast), dcm.masked_logits(model, heads, mask, full),
                atol=1e-5, rtol=0,
            )
    no_room = dcm.prepare_pairs(model, t, "last", [(2, 1)], max_restart_bytes=10)
    assert no_room.run is None and no_room.restart is None


def test_masks_trained_together_equal_masks_trained_alone(tiny, pairs, vocab):
    """Several masks in one forward (seeds of one desideratum and another desideratum on the
    same base prompts): each gets the mask, selection, eval accuracy and losses it gets alone."""
    model, tok = tiny
    heads = GROUPS["last"]
    other = desiderata.draw_splits(data.object_value, vocab, (96, 48, 16), 7, seed=0)
    fit = [dcm.prepare_pairs(model, pairs[0], "last", heads),
           dcm.prepare_pairs(model, desiderata.tokenize_pairs(tok, other.train), "last", heads)]
    evals = [dcm.prepare_pairs(model, pairs[1], "last", heads),
             dcm.prepare_pairs(model, desiderata.tokenize_pairs(tok, other.eval), "last", heads)]
    jobs = [dcm.MaskJob(fit[d], evals[d], seed) for d in (0, 1) for seed in (0, 1)]
    config = dcm.DCMConfig(batch_size=16, lam=0.0, lr=0.3)
    together = dcm.train_masks(model, heads, jobs, config)
    for job, found in zip(jobs, together):
        alone = dcm.train_mask(model, heads, job.train, job.eval, config, job.seed)
        torch.testing.assert_close(torch.tensor(found.mask), torch.tensor(alone.mask), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(found.losses), torch.tensor(alone.losses), atol=1e-4, rtol=1e-5)
        assert (found.selected, found.eval_accuracy, found.best_step) == (alone.selected, alone.eval_accuracy, alone.best_step)
    assert len({tuple(f.losses) for f in together}) == len(jobs)  # four different trainings
    assert len({tuple(f.mask) for f in together}) > 1
    # a mask per row is the same as one mask per call
    chunk, job = stacked([fit[0].take(torch.arange(8)), fit[1].take(torch.arange(8))])
    masks = torch.tensor([[0.2, 1.0, 0.7], [0.9, 0.0, 0.4]])
    with torch.no_grad():
        rows = dcm.masked_logits(model, heads, masks[job], chunk)
        for j in (0, 1):
            one = dcm.masked_logits(model, heads, masks[j], fit[j].take(torch.arange(8)))
            torch.testing.assert_close(rows[job == j], one, atol=1e-5, rtol=0)


def test_mask_gradient_flows_and_weights_stay_frozen(tiny, pairs):
    model = tiny[0]
    heads = GROUPS["last"]
    train, eval = (dcm.prepare_pairs(model, p, "last", heads) for p in pairs)
    before = copy.deepcopy(model.state_dict())
    config = dcm.DCMConfig(batch_size=16)
    a = dcm.train_mask(model, heads, train, eval, config, seed=0)
    b = dcm.train_mask(model, heads, train, eval, config, seed=0)
    c = dcm.train_mask(model, heads, train, eval, config, seed=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # restored after training
    assert a.steps == 12 and len(a.losses) == 12
    assert (a.mask, a.selected, a.losses) == (b.mask, b.selected, b.losses)  # deterministic per seed
    assert a.losses != c.losses  # another seed, another batch order
    assert all(0 <= m <= 1 for m in a.mask)
    mask = torch.full((len(heads),), 0.5, requires_grad=True)
    with frozen(model):
        dcm.masked_logits(model, heads, mask, train.take(torch.arange(8))).gather(1, train.target[:8, None]).sum().backward()
    assert mask.grad.abs().min() > 0 and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("index", [0, 2])
def test_dcm_finds_the_head_that_is_right_by_construction(tiny_dir, pairs, index):
    """Targets = the model's own answers when head X alone is patched (X's output scaled up so
    its effect dominates): DCM must select exactly X, with eval accuracy 1."""
    model, _, _ = models.load(tiny_dir, device="cpu")
    heads = GROUPS["last"]
    layer, head = heads[index]
    with torch.no_grad():
        model.blocks[layer].attn.W_O[head] *= 10
    only_x = torch.zeros(len(heads), dtype=torch.bool)
    only_x[index] = True
    data_ = []
    for p in pairs:
        d = dcm.prepare_pairs(model, p, "last", heads)
        with torch.no_grad():
            d.target = dcm.masked_logits(model, heads, (~only_x).float(), d).argmax(-1)
        data_.append(d)
    result = dcm.train_mask(model, heads, *data_, dcm.DCMConfig(lam=0.0, batch_size=8), seed=0)
    assert result.selected == [heads[index]] and result.eval_accuracy == 1.0 and result.best_step > 0


def test_nothing_selected_when_the_base_answer_is_the_target(tiny, pairs):
    model = tiny[0]
    heads = GROUPS["last"]
    data_ = []
    for p in pairs:
        d = dcm.prepare_pairs(model, p, "last", heads)
        with torch.no_grad():
            d.target = dcm.masked_logits(model, heads, torch.ones(len(heads)), d).argmax(-1)
        data_.append(d)
    result = dcm.train_mask(model, heads, *data_, dcm.DCMConfig(batch_size=16), seed=0)
    assert result.selected == [] and result.eval_accuracy == 1.0 and result.best_step == 0


def test_bootstrap():
    correct = torch.tensor([True] * 30 + [False] * 70)
    a = dcm.bootstrap(correct, 50, seed=0)
    assert len(a) == 50 and all(0 <= x <= 1 for x in a)
    assert abs(sum(a) / 50 - 0.3) < 0.03 and len(set(a)) > 5
    assert a == dcm.bootstrap(correct, 50, seed=0) and a != dcm.bootstrap(correct, 50, seed=1)
    with pytest.raises(data.DataError):
        dcm.bootstrap(correct, 0)


def test_run_dcm_shares_data_and_reuses_results(tiny, monkeypatch):
    """The paper's protocol over asks: one result per ask, seeds kept apart, every training
    saved under its key; a rerun with the saved results trains nothing and gives the same
    results; any changed setting in the key trains again."""
    model, tok = tiny
    plan = recipe.DCMPlan(dcm.DCMConfig(batch_size=16), (32, 16, 16), 7, data_seed=5, seeds=(0, 1), resamples=4)
    asks = [
        recipe.Ask(((1, 0), (1, 3)), "last", "object_value"),
        recipe.Ask(((1, 0), (1, 3)), "last", "object_value"),  # the same ask from another circuit
        recipe.Ask(((0, 3),), "prev_query_label", "positional"),
        recipe.Ask((), "query_label", "positional"),  # an empty group
    ]
    saved = {}
    first = recipe.run_dcm(model, tok, asks, plan, done=saved, on_result=saved.__setitem__)
    assert len(first) == 3 and len(saved) == 3 * 2
    assert set(saved) == {plan.key(a, s) for a in asks for s in plan.seeds}
    empty = first[asks[3]]
    assert empty.selected == [] and all(r.steps == 0 and len(r.test_correct) == 16 for r in empty.seeds.values())
    for result in first.values():
        assert set(result.seeds) == {0, 1} and len(result.accuracy) == 4
        for r in result.seeds.values():
            assert r.test_accuracy == pytest.approx(r.test_correct.float().mean().item())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished training was run again")

    monkeypatch.setattr(dcm.protocol, "train_masks", no_training)
    again = recipe.run_dcm(model, tok, asks, plan, done=saved)
    assert {a: recipe.dcm_entry(r) for a, r in again.items()} == {a: recipe.dcm_entry(r) for a, r in first.items()}
    other = recipe.DCMPlan(dcm.DCMConfig(batch_size=16, lam=0.1), (32, 16, 16), 7, data_seed=5, seeds=(0, 1))
    with pytest.raises(AssertionError, match="run again"):  # other settings: not reused
        recipe.run_dcm(model, tok, asks[:1], other, done=saved)


# ---------------------------------------------------------------------------------------------
# Commands


def _circuit(groups):
    return paper_circuit({g: hs for g, hs in groups.items()})


def test_dcm_commands(tmp_path, tiny_dir, monkeypatch, capsys):
    other_dir = tmp_path / "tiny-ft"
    make_checkpoint(other_dir, seed=7)
    results, figures = tmp_path / "results", tmp_path / "figures"
    base, ft = tiny_dir.name, other_dir.name
    _circuit({"value_fetcher": [(1, 0), (1, 1)], "pos_transmitter": [(1, 3)],
              "pos_detector": [(0, 1)], "struct_reader": [(0, 3)]}).save(results / base / "circuit.json")
    _circuit({"value_fetcher": [(1, 0), (1, 2)], "pos_transmitter": [(1, 3)],
              "pos_detector": [(0, 1)], "struct_reader": []}).save(results / ft / "circuit.json")
    binder = ("prev_query_label+1", "prev_query_label+2")  # a discovered group acting at two positions
    for name, fetchers in ((base, [(1, 1)]), (ft, [(1, 2)])):
        Circuit({"value_fetcher": fetchers, "binder": [(0, 0), (0, 2)]}, {"value_fetcher": "last", "binder": binder}).save(
            results / name / "discovered" / "circuit.json")
    common = ["--base", str(tiny_dir), "--results", str(results), "--n-train", "32", "--n-eval", "16",
              "--n-test", "16", "--seeds", "2", "--batch-size", "16", "--resamples", "5", "--device", "cpu", "--quiet"]
    assert main(["dcm", "--model", str(tiny_dir), *common]) == 0
    assert main(["dcm", "--model", str(other_dir), *common]) == 0

    own = json.loads((results / base / "dcm.json").read_text())
    assert own["base_circuit"] == own["own_circuit"] and own["base"] == base
    groups = own["base_circuit"]["groups"]
    assert set(groups["pos_transmitter"]) == set(desiderata.ALL)
    assert set(groups["value_fetcher"]) == set(desiderata.MAIN)
    entry = groups["value_fetcher"]["object_value"]
    assert set(entry["seeds"]) == {"0", "1"} and len(entry["accuracy"]) == 5
    assert entry["heads"] == entry["seeds"][str(entry["selected_seed"])]["heads"]
    assert all(h in [[1, 0], [1, 1]] for h in entry["heads"])

    ft_result = json.loads((results / ft / "dcm.json").read_text())
    assert ft_result["own_circuit"]["circuit"] == ft and ft_result["base_circuit"]["circuit"] == base
    assert ft_result["own_circuit"]["group_heads"]["struct_reader"] == []
    assert set(ft_result["base_circuit"]["groups"]["pos_transmitter"]) == set(desiderata.MAIN)
    own_groups = ft_result["own_circuit"]["groups"]  # what CMAP patches, read as cmap reads it
    assert {g: set(d) for g, d in own_groups.items()} == {
        "value_fetcher": {"object_value"}, "pos_transmitter": {"positional"}, "pos_detector": {"positional"},
    }
    assert all(h in {(1, 0), (1, 2)} for h in selected_heads(ft_result)["value_fetcher"]["object_value"])

    # the discovered reading: every group on the main desiderata at its own positions (the binder
    # at both of its), and on the fine-tuned model's own circuit what CMAP patches
    discovered = own["base_discovered"]
    assert discovered["positions"]["binder"] == list(binder) and set(discovered["groups"]) == {"value_fetcher", "binder"}
    assert set(discovered["groups"]["binder"]) == set(desiderata.MAIN)
    assert all(h in [[0, 0], [0, 2]] for e in discovered["groups"]["binder"].values() for h in e["heads"])
    assert {g: set(d) for g, d in ft_result["own_discovered"]["groups"].items()} == {"value_fetcher": {"object_value"}}

    # a rerun of both models in one process trains nothing and writes the same files
    monkeypatch.setattr(dcm, "train_masks", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main(["dcm", "--model", str(tiny_dir), str(other_dir), *common, "--figures", str(figures)]) == 0
    assert json.loads((results / base / "dcm.json").read_text()) == own
    assert json.loads((results / ft / "dcm.json").read_text()) == ft_result
    drawn = (results / "dcm.csv").read_text()  # the training process drew Figure 2 too
    assert (figures / "dcm.json").exists()
    (results / "dcm.csv").unlink()

    figure_args = ["--base", str(tiny_dir), "--models", str(tiny_dir), str(other_dir),
                   "--results", str(results), "--figures", str(figures)]
    assert main(["dcm-figure", *figure_args]) == 0
    import pandas as pd

    assert (results / "dcm.csv").read_text() == drawn
    frame = pd.read_csv(results / "dcm.csv")
    paper = 2 * (4 * 3 + 11) + 4 * 3 + 3  # base: both sections with extras; ft: main + CMAP's
    assert len(frame) == paper + 2 * 2 * 3 + 2 * 3 + 1  # discovered: base both sections; ft main + CMAP's
    assert frame.accuracy_mean.between(0, 100).all()
    assert set(frame[frame.group == "binder"].position) == {", ".join(binder)}
    for stem in ("dcm", "dcm_extra", "dcm_discovered"):
        assert (figures / f"{stem}.html").stat().st_size > 0 and (figures / f"{stem}.png").stat().st_size > 0

    capsys.readouterr()
    assert main(["dcm-figure", *figure_args[:1], str(other_dir), *figure_args[2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "circuit" in err[0]
    assert main(["dcm", "--model", str(tiny_dir), "--base", "missing", "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no circuit file" in err[0]
