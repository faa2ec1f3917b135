"""End to end on the planted model of tests/planted.py, whose answer is, by construction, copied
by one known head (L1H0) at the last token, while the seven other heads have no effect: path
patching ranks that head first, DCM selects exactly it, circuit evaluation gives it
faithfulness ~1 and a random circuit clearly less, and CMAP from the model with it into a model
without it recovers the accuracy. No number here is zero by accident."""

from __future__ import annotations

import pytest
import torch

from tests import oracles
from tests.planted import (
    ANSWERS,
    NO_EFFECT,
    PLANTED,
    other_answers,
    planted_model,
    planted_prompts,
    source_prompts,
    without_head,
)

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated")

# =============================================================================================
# Adapters: the only calls into et_circuits in this file. Porting the tests to another API
# means editing these functions only. Prompts are `et_circuits.PromptSet`s.

import et_circuits as _et  # noqa: E402
from et_circuits.methods import dcm as _dcm  # noqa: E402
from et_circuits.tasks.entity_tracking.paper import paper_circuit  # noqa: E402

_Q = _et.RunSettings(16, progress=False)


def code_path_patch_step1(model, clean, corrupt, method: str) -> torch.Tensor:
    """Step 1 (senders at the last token, read at the logits) scores of every head [layer, head]."""
    return _et.path_patch(model, clean, corrupt, "last", method=method, settings=_Q).scores


def _pair_data(model, pairs, position, heads):
    base, source, target = pairs
    return _dcm.prepare_pairs(model, _et.Pairs(base.replace(answers=target), source), position, heads)


def code_dcm(model, heads, position: str, train, eval, test, lam: float) -> dict:
    """Train a DCM mask over `heads` at `position` (the paper's lr 0.1, 2 epochs; batch 16) on
    (base, source, target) triples; the final mask (in `heads` order), the selected heads, eval
    accuracy, and the test accuracy when the selected heads are patched from source into base."""
    config = _et.DCMConfig(lam=lam, lr=0.1, epochs=2, batch_size=16)
    result = _dcm.train_mask(
        model,
        heads,
        _pair_data(model, train, position, heads),
        _pair_data(model, eval, position, heads),
        config=config,
        seed=0,
    )
    test_data = _pair_data(model, test, position, heads)
    logits = _dcm.patched_logits(model, heads, result.selected_mask(), test_data)
    correct = logits.argmax(-1) == test_data.target
    return {
        "mask": result.mask,
        "selected": result.selected,
        "eval_accuracy": result.eval_score,
        "test_accuracy": correct.float().mean().item(),
    }


def code_evaluate(model, groups: dict, prompts, reference, n_random: int) -> dict[str, float]:
    """Table 1's row: full, circuit, random (mean over `n_random` draws) and faithfulness."""
    ev = _et.evaluate_circuit(model, paper_circuit(groups), prompts, reference, n_random=n_random, seed=0, settings=_Q)
    return {"full": ev.full, "circuit": ev.circuit, "random": ev.random, "faithfulness": ev.faithfulness}


def code_cmap_accuracy(base, source, prompts, groups: dict, patch: str) -> dict[str, float]:
    """CMAP as the stage runs it: accuracy of `base`, of `source`, and of `base` with `groups`
    (paper group name -> heads, each at the package's position for it) patched with `patch`."""
    result = _et.cmap(base, source, prompts, [_et.Variant("test", patch, paper_circuit(groups))], settings=_Q)
    return {"base": result.base, "source": result.source, "patched": result.variants[0].value}


# =============================================================================================


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def prompts():
    return planted_prompts(48, seed=0)


def _accuracy(model, prompts) -> float:
    with torch.no_grad():
        logits = oracles.at_last(model(prompts.input_ids), prompts)
    return oracles.correct(logits, prompts.answers).float().mean().item()


def test_the_planted_model_is_built_as_described(planted, prompts):
    """Checked with TransformerLens alone: the model is always right and sure; the planted head
    puts ~all its attention on the answer-class token; the other heads write nothing; without
    the planted head's values the model never answers."""
    with torch.no_grad():
        logits, cache = planted.run_with_cache(prompts.input_ids)
    rows = torch.arange(len(prompts))
    last = oracles.at_last(logits, prompts)
    assert oracles.correct(last, prompts.answers).all()
    assert oracles.answer_prob(last, prompts.answers).min() > 0.99
    pattern = cache[f"blocks.{PLANTED[0]}.attn.hook_pattern"][rows, PLANTED[1], prompts.positions["last"]]
    assert pattern[rows, prompts.positions["answer"]].min() > 0.99
    for layer, head in NO_EFFECT:
        assert planted.blocks[layer].attn.W_O[head].abs().max() == 0
        assert cache[f"blocks.{layer}.attn.hook_z"][:, :, head].abs().max() > 0.1  # they do compute
    assert _accuracy(without_head(planted), prompts) == 0.0
    assert set(prompts.answers.tolist()) == set(ANSWERS)


def test_path_patching_ranks_the_planted_head_first(planted, prompts):
    """Corrupt prompts carry another answer token at the same place: the planted head's score is
    about -1 (the clean answer's probability vanishes), every other head's is 0."""
    corrupt = other_answers(prompts, seed=1)
    expected = oracles.path_patching_score(planted, prompts, corrupt, PLANTED, "last")
    assert expected < -0.99
    for method in ("fast", "reference"):
        scores = code_path_patch_step1(planted, prompts, corrupt, method)
        assert float(scores[PLANTED]) == pytest.approx(expected, abs=1e-5)
        assert divmod(int(scores.argmin()), planted.cfg.n_heads) == PLANTED
        for head in NO_EFFECT:
            assert abs(float(scores[head])) < 1e-5, head


@pytest.fixture(scope="module")
def dcm_pairs():
    """(base, source, target = the source's answer) for train (64), eval (32) and test (32):
    the object-value desideratum. Source prompts differ from their bases in length and in
    where the answer sits."""
    triples = []
    for n, seed in ((64, 10), (32, 20), (32, 30)):
        base = planted_prompts(n, seed)
        source = source_prompts(base, seed + 1)
        assert (source.answers != base.answers).all()
        assert (source.positions["last"] != base.positions["last"]).any()
        triples.append((base, source, source.answers))
    return triples


DCM_HEADS = [(1, 1), PLANTED, (0, 2), (1, 3)]  # the group at the last token: the planted head among no-effect heads


@pytest.mark.parametrize("lam", [0.01, 0.1])
def test_dcm_selects_exactly_the_planted_head(planted, dcm_pairs, lam):
    """Object-value pairs: only the planted head carries the answer. With lambda > 0 the
    sparsity term alone acts on the no-effect heads and keeps their masks at 1."""
    result = code_dcm(planted, DCM_HEADS, "last", *dcm_pairs, lam=lam)
    assert result["selected"] == [PLANTED]
    assert result["eval_accuracy"] == 1.0
    assert result["test_accuracy"] >= 0.95
    for head, m in zip(DCM_HEADS, result["mask"]):
        assert (m < 0.5) if head == PLANTED else (m == 1.0), (head, m)


def test_dcm_selects_nothing_when_the_target_is_the_base_answer(planted, dcm_pairs):
    """The control: nothing carries a change the target does not ask for."""
    train, eval, test = [(base, source, base.answers) for base, source, _ in dcm_pairs]
    result = code_dcm(planted, DCM_HEADS, "last", train, eval, test, lam=0.01)
    assert result["selected"] == []
    assert result["test_accuracy"] == 1.0


@pytest.fixture(scope="module")
def reference():
    return planted_prompts(48, seed=5)


def test_circuit_evaluation_faithfulness(planted, prompts, reference):
    """The true circuit (the planted head as group A, at the last token) is as good as the full
    model; random circuits of the same size (1 of 8 heads) mostly miss it."""
    row = code_evaluate(planted, {"value_fetcher": [PLANTED]}, prompts, reference, n_random=10)
    assert row["full"] == 1.0
    assert row["circuit"] >= 0.95 and row["faithfulness"] == pytest.approx(row["circuit"])
    assert row["random"] < 0.5


def test_circuit_evaluation_keeps_heads_at_their_groups_position(planted, prompts, reference):
    """The planted head kept only at the query label or the previous query label (as group C or
    D) is mean-ablated at the last token, where it matters: accuracy falls to chance level."""
    ablated = code_evaluate(planted, {"value_fetcher": []}, prompts, reference, n_random=1)["circuit"]
    assert ablated < 0.5
    for group in ("pos_detector", "struct_reader"):
        row = code_evaluate(planted, {"value_fetcher": [], group: [PLANTED]}, prompts, reference, n_random=1)
        assert row["circuit"] == pytest.approx(ablated)


def test_random_baseline_uses_the_circuits_group_sizes(planted, prompts, reference):
    """A circuit of the seven no-effect heads misses the planted head; random circuits of seven
    heads out of eight mostly contain it, so their accuracy is clearly higher."""
    row = code_evaluate(planted, {"value_fetcher": NO_EFFECT}, prompts, reference, n_random=10)
    assert row["circuit"] < 0.5
    assert row["random"] > row["circuit"] + 0.3


def test_cmap_recovers_the_accuracy(planted, prompts):
    """Base = the model without the planted head's values (accuracy 0), source = the planted
    model (accuracy 1): patching the planted head's z at the last token restores the answer."""
    base = without_head(planted)
    result = code_cmap_accuracy(base, planted, prompts, {"value_fetcher": [PLANTED]}, "z")
    assert (result["base"], result["source"]) == (0.0, 1.0)
    assert result["patched"] >= 0.95


def test_cmap_patches_only_what_it_is_asked_to(planted, prompts):
    """No recovery from a no-effect head, from the planted head at another group's position, or
    from the planted head's q, k and v at the last token (the answer's value sits at the
    answer's position, which input patching at the group's position does not touch)."""
    base = without_head(planted)
    for groups, patch in (
        ({"value_fetcher": [(1, 1), (0, 0)]}, "z"),
        ({"pos_detector": [PLANTED]}, "z"),
        ({"struct_reader": [PLANTED]}, "z"),
        ({"value_fetcher": [PLANTED]}, "qkv"),
    ):
        assert code_cmap_accuracy(base, planted, prompts, groups, patch)["patched"] == 0.0, (groups, patch)
