"""DCM on tiny random LLaMAs: the masked forward against independent hook code, the restart fast
path against the full forward, mask training (frozen weights, determinism, a head that is right
by construction), bootstrap resampling, and the result types (`DCMResult`, `SeedResult`)."""

import copy
import json

import pytest
import torch

from et_circuits import models
from et_circuits.core.errors import DataError
from et_circuits.methods import dcm
from et_circuits.methods.dcm import DCMResult, SeedResult, protocol
from et_circuits.methods.dcm.masking import frozen
from et_circuits.methods.dcm.training import stacked
from et_circuits.tasks.entity_tracking import data, desiderata
from tests.conftest import make_checkpoint

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
                dcm.masked_logits(model, heads, mask, fast),
                dcm.masked_logits(model, heads, mask, full),
                atol=1e-5,
                rtol=0,
            )
    no_room = dcm.prepare_pairs(model, t, "last", [(2, 1)], max_restart_bytes=10)
    assert no_room.run is None and no_room.restart is None


def test_masks_trained_together_equal_masks_trained_alone(tiny, pairs, vocab):
    """Several masks in one forward (seeds of one desideratum and another desideratum on the
    same base prompts): each gets the mask, selection, eval accuracy and losses it gets alone."""
    model, tok = tiny
    heads = GROUPS["last"]
    other = desiderata.draw_splits(data.object_value, vocab, (96, 48, 16), 7, seed=0)
    fit = [
        dcm.prepare_pairs(model, pairs[0], "last", heads),
        dcm.prepare_pairs(model, desiderata.tokenize_pairs(tok, other.train), "last", heads),
    ]
    evals = [
        dcm.prepare_pairs(model, pairs[1], "last", heads),
        dcm.prepare_pairs(model, desiderata.tokenize_pairs(tok, other.eval), "last", heads),
    ]
    jobs = [dcm.MaskJob(fit[d], evals[d], seed) for d in (0, 1) for seed in (0, 1)]
    config = dcm.DCMConfig(batch_size=16, lam=0.0, lr=0.3)
    together = dcm.train_masks(model, heads, jobs, config=config)
    for job, found in zip(jobs, together):
        alone = dcm.train_mask(model, heads, job.train, job.eval, config=config, seed=job.seed)
        torch.testing.assert_close(torch.tensor(found.mask), torch.tensor(alone.mask), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(found.losses), torch.tensor(alone.losses), atol=1e-4, rtol=1e-5)
        assert (found.selected, found.eval_score, found.best_step) == (
            alone.selected,
            alone.eval_score,
            alone.best_step,
        )
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
    a = dcm.train_mask(model, heads, train, eval, config=config, seed=0)
    b = dcm.train_mask(model, heads, train, eval, config=config, seed=0)
    c = dcm.train_mask(model, heads, train, eval, config=config, seed=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # restored after training
    assert a.steps == 12 and len(a.losses) == 12
    assert (a.mask, a.selected, a.losses) == (b.mask, b.selected, b.losses)  # deterministic per seed
    assert a.losses != c.losses  # another seed, another batch order
    assert all(0 <= m <= 1 for m in a.mask)
    mask = torch.full((len(heads),), 0.5, requires_grad=True)
    with frozen(model):
        dcm.masked_logits(model, heads, mask, train.take(torch.arange(8))).gather(
            1, train.target[:8, None]
        ).sum().backward()
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
    result = dcm.train_mask(model, heads, *data_, config=dcm.DCMConfig(lam=0.0, batch_size=8), seed=0)
    assert result.selected == [heads[index]] and result.eval_score == 1.0 and result.best_step > 0


def test_nothing_selected_when_the_base_answer_is_the_target(tiny, pairs):
    model = tiny[0]
    heads = GROUPS["last"]
    data_ = []
    for p in pairs:
        d = dcm.prepare_pairs(model, p, "last", heads)
        with torch.no_grad():
            d.target = dcm.masked_logits(model, heads, torch.ones(len(heads)), d).argmax(-1)
        data_.append(d)
    result = dcm.train_mask(model, heads, *data_, config=dcm.DCMConfig(batch_size=16), seed=0)
    assert result.selected == [] and result.eval_score == 1.0 and result.best_step == 0


def test_scores_without_heads_keep_no_autograd_graph(tiny, pairs, monkeypatch):
    """A question without heads scores the unpatched model, whose logits are cached per prompt
    set: computed with grad, each cached row kept its chunk's whole graph alive (GBs)."""
    seen = []
    real = protocol.masked_logits

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.requires_grad)
        return out

    monkeypatch.setattr(protocol, "masked_logits", spy)
    result = dcm.dcm(tiny[0], [], "last", pairs[0], pairs[1], n_train=64, n_eval=32, seeds=(0, 1))
    assert seen and not any(seen) and result.heads == ()


def test_bootstrap():
    correct = torch.tensor([True] * 30 + [False] * 70)
    a = dcm.bootstrap(correct, 50, seed=0)
    assert len(a) == 50 and all(0 <= x <= 1 for x in a)
    assert abs(sum(a) / 50 - 0.3) < 0.03 and len(set(a)) > 5
    assert a == dcm.bootstrap(correct, 50, seed=0) and a != dcm.bootstrap(correct, 50, seed=1)
    with pytest.raises(DataError):
        dcm.bootstrap(correct, 0)


# ---------------------------------------------------------------------------------------------
# The result types, from a real run of the protocol on the tiny model


@pytest.fixture(scope="module")
def answered(tiny_dir, vocab):
    """`dcm` on three heads at the last token, two seeds, five resamplings, on pairs whose
    targets are the model's own answers with head L1H0 (scaled up) patched: on the fit pairs
    always, on the test pairs for three in four (so the test accuracy is neither 0 nor 1)."""
    model, tok, _ = models.load(tiny_dir, device="cpu")  # a copy: one head is scaled below
    heads = GROUPS["last"]
    with torch.no_grad():
        model.blocks[1].attn.W_O[0] *= 10
    only_first = torch.tensor([True, False, False])
    splits = desiderata.draw_splits(data.positional, vocab, (32, 16, 16), 7, seed=2)

    def targeted(part, keep_base=()):
        p = desiderata.tokenize_pairs(tok, part)
        target = dcm.patched_logits(model, heads, only_first, dcm.prepare_pairs(model, p, "last", heads)).argmax(-1)
        target[list(keep_base)] = p.base.answers[list(keep_base)]
        return dcm.Pairs(p.base.replace(answers=target), p.source)

    fit, test = targeted(splits.train + splits.eval), targeted(splits.test, keep_base=range(0, 16, 4))
    return dcm.dcm(
        model,
        heads,
        "last",
        fit,
        test,
        n_train=32,
        n_eval=16,
        seeds=(0, 1),
        config=dcm.DCMConfig(lam=0.0, lr=0.5, batch_size=8),
        resamples=5,
    )


def test_dcm_result_fields(answered):
    r = answered
    assert r.heads == tuple(GROUPS["last"]) and r.position == "last" and r.metric == "accuracy"
    assert set(r.seeds) == {0, 1} and r.selected_seed in r.seeds and len(r.resampled) == 5
    chosen = r.seeds[r.selected_seed]
    assert r.selected == chosen.heads and (1, 0) in r.selected and 0 < r.mean < 1 and r.std > 0
    assert chosen.eval_score == max(s.eval_score for s in r.seeds.values())
    for s in r.seeds.values():
        assert s.test_values.dtype == torch.float32 and len(s.test_values) == 16
        assert s.test_score == pytest.approx(s.test_values.mean().item()) and s.steps == 8
    assert r.mean == pytest.approx(sum(r.resampled) / 5)
    assert r.test_mean == pytest.approx(sum(s.test_score for s in r.seeds.values()) / 2)


def _same_seed(a: SeedResult, b: SeedResult) -> bool:
    return (a.heads, a.mask, a.eval_score, a.test_score, a.best_step, a.steps, a.seconds) == (
        b.heads,
        b.mask,
        b.eval_score,
        b.test_score,
        b.best_step,
        b.steps,
        b.seconds,
    ) and torch.equal(a.test_values, b.test_values)


def test_dcm_result_round_trips_through_json(answered):
    r = answered
    back = DCMResult.from_json(json.loads(json.dumps(r.to_json())))
    assert (back.heads, back.position, back.selected_seed, back.resampled, back.metric) == (
        r.heads,
        r.position,
        r.selected_seed,
        r.resampled,
        r.metric,
    )
    assert set(back.seeds) == set(r.seeds) and all(_same_seed(back.seeds[s], r.seeds[s]) for s in r.seeds)
    assert (back.mean, back.std, back.selected) == (r.mean, r.std, r.selected)
    seed = r.seeds[r.selected_seed]
    assert _same_seed(SeedResult.from_json(json.loads(json.dumps(seed.to_json()))), seed)


def test_dcm_result_frame_and_repr(answered):
    r = answered
    frame = r.to_frame()
    assert list(frame.columns) == ["seed", "selected", "heads", "eval_score", "test_score", "best_step", "steps"]
    assert list(frame.seed) == list(r.seeds) and list(frame.selected) == [s == r.selected_seed for s in r.seeds]
    assert list(frame.test_score) == [s.test_score for s in r.seeds.values()]
    text = repr(r)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert f"{r.mean:.3f} ± {r.std:.3f}" in text and "of 3 heads at last" in text
