"""Path patching: the fast method equals the reference (1e-5, fp32) on the paper's steps and on
randomised cases (q, k and v receivers, sender and receiver positions, position sets, GQA, each
metric, learned positional embeddings), the reference follows the semantics on a direct case,
bad input is refused, `top_heads` ranks, and the `PathPatching` result reads and writes."""

from __future__ import annotations

import json
import random

import pytest
import torch

import et_circuits as et
from et_circuits import models
from et_circuits.core.errors import CircuitError, DataError
from et_circuits.core.hooks import hook_name, logits_at, patch_hooks, per_head_values
from et_circuits.core.prepared import _first_change
from et_circuits.core.settings import RunSettings
from et_circuits.core.types import Receiver
from et_circuits.methods import discovery
from et_circuits.methods import path_patching as pp
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from tests.planted import scaled_llama

S = RunSettings(batch_size=6, progress=False)
STEP = {s.group: s for s in PAPER_STEPS}
# Receivers of a 4-layer model, spread over the layers so that every step has reachable and
# unreachable senders.
RECEIVERS = {
    "value_fetcher": [],
    "pos_transmitter": [(3, 0), (2, 1)],
    "pos_detector": [(2, 0), (3, 2)],
    "struct_reader": [(1, 1), (3, 3)],
}


def _receivers(group):
    return discovery.step_receivers(STEP[group], RECEIVERS[group])


def _with_wrong_answers(clean, corrupt):
    """Logit-difference prompts: the wrong answer of a clean prompt is its corrupt answer."""
    return clean.replace(wrong_answers=corrupt.answers), corrupt


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def scaled(request, tmp_path_factory):
    model, tok = scaled_llama(tmp_path_factory.mktemp("scaled"), request.param)
    vocab = data.vocabulary(tok, min_labels=8)
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, 20, 7, seed=3)
    return model, tok, clean, corrupt


@pytest.mark.parametrize("group", list(RECEIVERS))
def test_paper_steps_fast_equals_reference(scaled, group):
    model, _, clean, corrupt = scaled
    step = STEP[group]
    kwargs = dict(receivers=_receivers(group) or None, settings=S)
    fast = pp.path_patch(model, clean, corrupt, step.position, **kwargs).scores
    ref = pp.path_patch(model, clean, corrupt, step.position, method="reference", **kwargs).scores
    assert fast.shape == (4, 4) and not fast.isnan().any()
    assert ref.abs().max() > 1e-3  # the comparison is not between zeros (100x the tolerance)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    if step.receiver_kind is not None:  # a sender at or above every receiver cannot reach one
        top = max(layer for layer, _ in RECEIVERS[group])
        assert (fast[top:] == 0).all()
        assert ref[top:].abs().max() < 1e-6


def _random_case(rng: random.Random):
    """A sender position, distinct receivers (kind and position drawn at random, sometimes at a
    position the senders do not reach; none only for senders at the last position, whose
    direct effect is read) and a metric."""
    positions = ["last", "query_label", "prev_query_label", "labels+1", "objects"]
    sender = rng.choice(positions)
    receivers = set()
    for _ in range(rng.randint(0 if sender == "last" else 1, 3)):
        at = sender if rng.random() < 0.7 else rng.choice(positions)
        receivers.add(Receiver(rng.randrange(1, 4), rng.randrange(4), rng.choice("qkv"), at))
    metric = rng.choice([None, et.logit_diff])
    return sender, sorted(receivers) or None, metric


@pytest.mark.parametrize("case", range(12))
def test_random_cases_fast_equals_reference(scaled, case):
    model, _, clean, corrupt = scaled
    sender, receivers, metric = _random_case(random.Random(case))
    clean, corrupt = _with_wrong_answers(clean, corrupt)
    kwargs = dict(receivers=receivers, metric=metric, settings=S)
    fast = pp.path_patch(model, clean, corrupt, sender, **kwargs).scores
    ref = pp.path_patch(model, clean, corrupt, sender, method="reference", **kwargs).scores
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_random_cases_are_not_all_zero(scaled):
    """Most drawn cases have effects well above the tolerance (so the test above tests)."""
    model, _, clean, corrupt = scaled
    clean, corrupt = _with_wrong_answers(clean, corrupt)
    largest = []
    for case in range(12):
        sender, receivers, metric = _random_case(random.Random(case))
        scores = pp.path_patch(model, clean, corrupt, sender, receivers=receivers, metric=metric, settings=S).scores
        largest.append(scores.abs().max())
    assert sum(x > 1e-4 for x in largest) >= 10  # 10x the tolerance


def test_a_receiver_keeps_its_frozen_input_where_other_patches_move_it(tmp_path):
    """Receivers off the sender positions are held at their (clean) frozen-run input, which
    blocks what the other receivers' patches would change there: adding such receivers changes
    the scores, and the fast method agrees (float64, so the small effect stands clear of
    rounding)."""
    model, tok = scaled_llama(tmp_path, dtype=torch.float64)
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 20, 7, seed=3)
    through_v = [Receiver(2, 2, "v", "labels+1")]
    blocked = through_v + [Receiver(3, h, kind, "labels") for h in range(4) for kind in "kv"]
    one = pp.path_patch(model, clean, corrupt, "labels+1", receivers=through_v, method="reference", settings=S).scores
    two = pp.path_patch(model, clean, corrupt, "labels+1", receivers=blocked, method="reference", settings=S).scores
    assert (one - two).abs().max() > 2e-5
    fast = pp.path_patch(model, clean, corrupt, "labels+1", receivers=blocked, settings=S).scores
    torch.testing.assert_close(fast, two, atol=1e-6, rtol=0)


def test_metric_and_relative(scaled):
    """The default is the relative change of the mean answer probability; a passed metric is
    absolute unless asked; relative = absolute / metric(clean)."""
    model, _, clean, corrupt = scaled
    rel = pp.path_patch(model, clean, corrupt, "last", settings=S)
    absolute = pp.path_patch(model, clean, corrupt, "last", metric=et.answer_prob, settings=S)
    assert (rel.relative, rel.metric) == (True, "answer_prob") and absolute.relative is False
    with torch.no_grad():
        p_clean = et.answer_prob(et.last_logits(model, clean), clean).item()
    torch.testing.assert_close(rel.scores, absolute.scores / p_clean, atol=1e-5, rtol=1e-4)
    again = pp.path_patch(model, clean, corrupt, "last", metric=et.answer_prob, relative=True, settings=S)
    torch.testing.assert_close(again.scores, rel.scores, atol=1e-6, rtol=1e-6)


def test_prepare_corrupt_runs_start_at_the_first_change(scaled):
    """The corrupt runs restart from the clean prefix at their first changed token; the heads
    they read equal those of whole corrupt forwards."""
    model, _, clean, corrupt = scaled
    positions = [s.position for s in PAPER_STEPS]
    start = _first_change(clean, corrupt, positions)
    assert (start > 0).all() and len(start.unique()) > 1  # the prefix shortcut is exercised
    assert torch.equal(start, clean.position("prev_query_label"))  # where the corruption starts
    runs = pp.prepare_runs(model, clean, corrupt, positions, S)
    with per_head_values(model), torch.no_grad():
        _, cache = model.run_with_cache(corrupt.input_ids)
    for where in positions:
        for layer in range(model.cfg.n_layers):
            whole = cache[hook_name("z", layer)][torch.arange(len(clean)), clean.position(where)]
            torch.testing.assert_close(runs.corrupt_z[where][layer][:, 0], whole, atol=1e-5, rtol=1e-5)


def test_fast_runs_in_bfloat16(tmp_path):
    """The dtype of 7B runs on a GPU: the fast method's caches, prefix runs and patches keep
    bf16 (run here on CPU) and give the reference's scores within bf16 rounding, relative to
    each step's largest score."""
    model, tok = scaled_llama(tmp_path, n_kv_heads=2, dtype=torch.bfloat16)
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 12, 7, seed=3)
    runs = pp.prepare_runs(model, clean, corrupt, [s.position for s in PAPER_STEPS], S)
    assert runs.run.keys[0].dtype == runs.corrupt_z["last"][0].dtype == torch.bfloat16
    for group in RECEIVERS:
        step = STEP[group]
        receivers = _receivers(group) or None
        fast = pp.path_patch(model, clean, corrupt, step.position, receivers=receivers, settings=S, runs=runs).scores
        ref = pp.path_patch(
            model, clean, corrupt, step.position, receivers=receivers, method="reference", settings=S
        ).scores
        scale = ref.abs().max()
        assert scale > 1e-3
        torch.testing.assert_close(fast, ref, atol=0.02 * scale.item(), rtol=0)


def test_fast_small_tiles_equal_reference(scaled):
    """Few rows per pass: sender groups split inside a layer and across prompt chunks."""
    model, _, clean, corrupt = scaled
    receivers = _receivers("struct_reader")
    small = pp.path_patch(
        model, clean, corrupt, "prev_query_label", receivers=receivers, settings=RunSettings(6, 7, False)
    ).scores
    ref = pp.path_patch(
        model,
        clean,
        corrupt,
        "prev_query_label",
        receivers=receivers,
        method="reference",
        settings=RunSettings(20, progress=False),
    ).scores
    torch.testing.assert_close(small, ref, atol=1e-5, rtol=1e-5)


def test_identical_corruption_scores_zero(scaled):
    model, _, clean, _ = scaled
    for method in pp.METHODS:
        for group in ("value_fetcher", "struct_reader"):
            receivers = _receivers(group) or None
            s = pp.path_patch(
                model, clean, clean, STEP[group].position, receivers=receivers, method=method, settings=S
            ).scores
            assert s.abs().max() < 1e-5, (method, group)


def test_last_layer_sender_is_a_direct_patch(scaled):
    """Step 1 for a last-layer head needs no freezing: it equals patching its corrupt hook_z
    at the last token of a clean run (an independent check of the semantics)."""
    model, _, clean, corrupt = scaled
    layer, head = 3, 2
    scores = pp.path_patch(model, clean, corrupt, "last", senders=[(layer, head)], settings=S).scores
    assert scores.isnan().sum() == 15 and not scores[layer, head].isnan()
    last = clean.position("last")
    with torch.no_grad(), per_head_values(model):
        _, cache = model.run_with_cache(corrupt.input_ids, names_filter=hook_name("z", layer))
        bad = cache[hook_name("z", layer)][torch.arange(len(clean)), last]
        weights = torch.zeros(4, 4, dtype=torch.bool)
        weights[layer, head] = True
        patched = model.run_with_hooks(clean.input_ids, fwd_hooks=patch_hooks("z", {layer: bad}, last, weights))
        base = model(clean.input_ids)
    rows = torch.arange(len(clean))
    prob = lambda logits: torch.softmax(logits_at(logits, last), -1)[rows, clean.answers]  # noqa: E731
    expected = (prob(patched).mean() - prob(base).mean()) / prob(base).mean()  # ratio of means
    torch.testing.assert_close(scores[layer, head], expected, atol=1e-6, rtol=1e-5)


def test_learned_positional_embeddings(vocab):
    """A GPT-2-style model (learned absolute positions, LayerNorm, biases): the fast method's
    corrupt runs add the positional embeddings of their offset, so it equals the reference."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        n_ctx=128,
        d_head=8,
        n_heads=4,
        d_vocab=len(tok),
        act_fn="gelu",
        positional_embedding_type="standard",
        normalization_type="LN",
        seed=0,
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3)  # sizeable head effects
        model.pos_embed.W_pos.mul_(3)  # and positions that matter
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 12, 7, seed=3)
    for position, receivers in [("last", None), ("prev_query_label", [Receiver(2, 1, "v", "prev_query_label")])]:
        fast = pp.path_patch(model, clean, corrupt, position, receivers=receivers, settings=S).scores
        ref = pp.path_patch(model, clean, corrupt, position, receivers=receivers, method="reference", settings=S).scores
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_gqa_restores_grouping(scaled):
    model = scaled[0]
    grouped = model.cfg.n_key_value_heads is not None
    assert model.cfg.ungroup_grouped_query_attention is False
    with per_head_values(model):
        assert model.cfg.ungroup_grouped_query_attention is grouped
    assert model.cfg.ungroup_grouped_query_attention is False


def test_bad_input_is_refused(scaled):
    model, tok, clean, corrupt = scaled
    with pytest.raises(CircuitError, match="unknown path-patching method"):
        pp.path_patch(model, clean, corrupt, "last", method="magic")
    with pytest.raises(CircuitError, match="receiver input"):
        pp.path_patch(model, clean, corrupt, "last", receivers=[Receiver(1, 1, "z", "last")])
    with pytest.raises(CircuitError, match="outside the model"):
        pp.path_patch(model, clean, corrupt, "last", receivers=[Receiver(9, 0, "q", "last")])
    with pytest.raises(DataError, match="unknown position"):
        pp.path_patch(model, clean, corrupt, "S2")
    with pytest.raises(DataError, match="pairs"):
        pp.path_patch(model, clean, corrupt[:5], "last")
    longer = data.make_prompts(tok, data.sample_prompts(data.vocabulary(tok), len(clean), 8, 0))
    with pytest.raises(DataError, match="pairs"):
        pp.path_patch(model, clean, longer, "last")
    runs = pp.prepare_runs(model, clean, corrupt, ["last"], S)
    with pytest.raises(CircuitError, match="do not cover"):
        pp.path_patch(model, clean, corrupt, "query_label", runs=runs)
    with pytest.raises(DataError, match="wrong_answers"):
        pp.path_patch(model, clean, corrupt, "last", metric=et.logit_diff, settings=S)
    with pytest.raises(TypeError):  # options after the sender position are keyword-only
        pp.path_patch(model, clean, corrupt, "last", [Receiver(1, 1, "q", "last")])


def test_top_heads():
    scores = torch.tensor([[0.5, -0.2, float("nan")], [-0.9, -0.2, 0.0]])
    assert pp.top_heads(scores, 3) == [(1, 0), (0, 1), (1, 1)]  # tie: lower layer first
    assert (0, 2) not in pp.top_heads(scores, 6) and len(pp.top_heads(scores, 6)) == 5  # NaN: not a sender
    assert pp.top_heads(scores, 3, among=[(0, 0), (1, 1), (0, 2)]) == [(1, 1), (0, 0)]
    result = pp.PathPatching(scores, "last")
    assert pp.top_heads(result, 3) == result.top(3) == pp.top_heads(scores, 3)
    with pytest.raises(CircuitError, match="top-k"):
        pp.top_heads(scores, -1)


# ---------------------------------------------------------------------------------------------
# The result type


@pytest.fixture(scope="module")
def through_receivers(scaled):
    """A real `PathPatching`: senders at the previous query label through two heads' values
    there; only some senders scored (the others NaN), one of them at the receivers' layer (0)."""
    model, _, clean, corrupt = scaled
    receivers = [Receiver(2, 0, "v", "prev_query_label"), Receiver(2, 3, "v", "prev_query_label")]
    senders = [(0, h) for h in range(4)] + [(2, 1)]
    return pp.path_patch(
        model, clean[:6], corrupt[:6], "prev_query_label", receivers=receivers, senders=senders, settings=S
    )


def test_path_patching_json_round_trip(through_receivers):
    result = through_receivers
    assert result.n == 6 and result.method == "fast" and len(result.receivers) == 2
    assert result.scores.isnan().sum() == 11 and result.scores[2, 1] == 0 and result.scores[0].abs().max() > 1e-3
    d = result.to_json()
    text = json.dumps(d)  # plain JSON: NaN written as null
    assert "NaN" not in text
    back = pp.PathPatching.from_json(json.loads(text))
    assert back.to_json() == d
    torch.testing.assert_close(back.scores, result.scores, equal_nan=True, atol=0, rtol=0)
    assert (back.sender_position, back.receivers, back.metric, back.relative, back.method, back.n) == (
        result.sender_position,
        result.receivers,
        result.metric,
        result.relative,
        result.method,
        result.n,
    )
    assert all(isinstance(r, Receiver) for r in back.receivers)


def test_path_patching_frame(through_receivers):
    result = through_receivers
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "head", "score"]
    assert len(frame) == int((~result.scores.isnan()).sum()) == 5  # one row per sender
    assert list(frame["score"]) == sorted(frame["score"])  # most negative first
    for row in frame.itertuples():
        assert row.score == pytest.approx(float(result.scores[row.layer, row.head]))
    assert [(r.layer, r.head) for r in frame.itertuples()][:3] == result.top(3)


def test_path_patching_repr(through_receivers):
    text = repr(through_receivers)
    assert "\n" not in text and len(text) < 300 and "tensor" not in text
    assert text.startswith("PathPatching(at prev_query_label, 5 senders, through 2 v inputs")
    l, h = max(through_receivers.top(3), key=lambda head: abs(float(through_receivers.scores[head])))
    score = float(through_receivers.scores[l, h])
    assert abs(score) > 1e-3  # a number with more digits than the repr shows
    assert f"L{l}H{h} {score:.3f}" in text and repr(score) not in text  # rounded to 3 decimals
    assert "n=6" in text


@pytest.fixture(scope="module")
def organism():
    model, tok, _ = models.load("organism-llama", device="cpu")
    return model, tok


@pytest.mark.slow
def test_fast_equals_reference_on_organism(organism):
    model, tok = organism
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 16, 7, seed=0)
    previous: list = []
    for step, k in zip(PAPER_STEPS, (4, 4, 4, 4)):
        receivers = discovery.step_receivers(step, previous) or None
        fast = pp.path_patch(model, clean, corrupt, step.position, receivers=receivers, settings=S)
        ref = pp.path_patch(
            model,
            clean,
            corrupt,
            step.position,
            receivers=receivers,
            method="reference",
            settings=RunSettings(16, progress=False),
        )
        torch.testing.assert_close(fast.scores, ref.scores, atol=1e-5, rtol=1e-5)
        previous = pp.top_heads(fast, k)
