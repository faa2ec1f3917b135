"""The package against the independent oracles of tests/oracles.py on random tiny LLaMAs whose
heads all matter (tests/planted.py): mean-ablation circuit evaluation (Table 1), path-patching
steps 1-4 with q, k and v receivers (MHA and GQA), DCM's patched logits, loss gradient and first
training step, and CMAP's cross-model patch. Each comparison is made where the compared numbers
are clearly nonzero (well above the tolerance), and where a mistake might leave them unchanged
the test also checks that the mistake would change the oracle's answer (so the test can fail)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests import oracles
from tests.planted import corrupted, random_llama, random_prompts, with_own_answers

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated")

# =============================================================================================
# Adapters: the only calls into et_circuits in this file. Porting the tests to another API
# means editing these functions only. Prompts are `et_circuits.PromptSet`s.

import et_circuits as _et  # noqa: E402
from et_circuits.methods import cmap as _cmap  # noqa: E402
from et_circuits.methods import dcm as _dcm  # noqa: E402
from et_circuits.methods import discovery as _discovery  # noqa: E402
from et_circuits.methods import path_patching as _pp  # noqa: E402
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS as _PAPER_STEPS  # noqa: E402
from et_circuits.tasks.entity_tracking.paper import paper_circuit as _paper_circuit  # noqa: E402

_Q = _et.RunSettings(batch_size=5, progress=False)


def code_path_patch_step(model, clean, corrupt, step: int, receivers, senders, method: str) -> torch.Tensor:
    """Scores [layer, head] (NaN off `senders`) of the paper's step `step` (1-4) as the package
    defines it: its sender position and receiver kind come from the package (`PAPER_STEPS`)."""
    s = _PAPER_STEPS[step - 1]
    return _pp.path_patch(
        model,
        clean,
        corrupt,
        s.position,
        receivers=_discovery.step_receivers(s, receivers) or None,
        senders=senders,
        method=method,
        settings=_Q,
    ).scores


def code_path_patch(model, clean, corrupt, position: str, kind: str, receivers, senders, method: str) -> torch.Tensor:
    """Scores of a path-patching step with senders at `position` and receivers' input `kind`."""
    rs = [_et.Receiver(l, h, kind, position) for l, h in receivers] if kind else None
    return _pp.path_patch(
        model, clean, corrupt, position, receivers=rs, senders=senders, method=method, settings=_Q
    ).scores


def code_circuit_accuracy(model, groups: dict, prompts, reference, batch_size: int = 16) -> float:
    """Mean-ablation accuracy of the circuit `groups` (paper group name -> heads; each group at
    the package's position for it), means over `reference`."""
    means = _et.position_means(model, reference)
    return _et.ablated_accuracy(
        model, _paper_circuit(groups), prompts, means, settings=_et.RunSettings(batch_size, progress=False)
    )


def code_evaluate(model, groups: dict, prompts, reference, n_random: int) -> dict[str, float]:
    """Table 1's row: full, circuit, random (mean over `n_random` draws) and faithfulness."""
    ev = _et.evaluate_circuit(
        model,
        _paper_circuit(groups),
        prompts,
        reference,
        n_random=n_random,
        seed=0,
        settings=_et.RunSettings(16, progress=False),
    )
    return {"full": ev.full, "circuit": ev.circuit, "random": ev.random, "faithfulness": ev.faithfulness}


def _pair_data(model, base, source, target, position, heads, resume=True):
    pairs = _et.Pairs(base.replace(answers=target), source)
    return _dcm.prepare_pairs(model, pairs, position, heads, run=resume)


def code_dcm_logits(model, base, source, target, position: str, heads, mask, resume: bool) -> torch.Tensor:
    """DCM's last-token logits of the base prompts with `heads` mixed by `mask` (differentiable
    in `mask`); `resume` picks the package's resumed fast path or its full forward."""
    data = _pair_data(model, base, source, target, position, heads, resume)
    return _dcm.masked_logits(model, heads, mask, data)


def code_dcm_train(model, heads, position: str, train, eval, lam: float, epochs: int, batch_size: int) -> dict:
    """One DCM mask training (train / eval = (base, source, target)); lr 0.1, seed 0."""
    config = _et.DCMConfig(lam=lam, lr=0.1, epochs=epochs, batch_size=batch_size)
    result = _dcm.train_mask(
        model,
        heads,
        _pair_data(model, *train, position, heads),
        _pair_data(model, *eval, position, heads),
        config=config,
        seed=0,
    )
    return {"selected": result.selected, "mask": result.mask, "losses": result.losses}


def code_cmap_logits(base, source, prompts, sites) -> torch.Tensor:
    """CMAP's primitive: last-token logits of `base` with each (kind, position, heads) site
    overwritten by `source`'s values on the same prompts."""
    n_layers, n_heads = base.cfg.n_layers, base.cfg.n_heads
    masks = {}
    for kind, position, heads in sites:
        m = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in heads:
            m[layer, head] = True
        masks[(kind, position)] = m
    logits = _cmap.cross_model_logits(base, source, prompts, masks)
    return oracles.at_last(logits, prompts)


def code_cmap_accuracy(base, source, prompts, groups: dict, patch: str) -> dict[str, float]:
    """CMAP as the stage runs it: accuracy of `base`, of `source`, and of `base` with `groups`
    (paper group name -> heads, each at the package's position for it) patched with `patch`."""
    variant = _et.Variant("test", patch, _paper_circuit(groups))
    result = _et.cmap(base, source, prompts, [variant], settings=_et.RunSettings(16, progress=False))
    return {"base": result.base, "source": result.source, "patched": result.variants[0].value}


# =============================================================================================

# The paper's groups and where each acts (SPEC.md, Table 1 protocol): written here, not read from
# the package, so a wrong position in the package is caught.
PAPER_POSITIONS = {
    "value_fetcher": "last",
    "pos_transmitter": "last",
    "pos_detector": "query_label",
    "struct_reader": "prev_query_label",
}
# The paper's path-patching steps: (sender position, receiver input kind).
PAPER_STEPS = {1: ("last", None), 2: ("last", "q"), 3: ("query_label", "v"), 4: ("prev_query_label", "v")}
TOL = 1e-5  # fp32


def _groups_at(groups: dict) -> list:
    """Paper groups -> the oracle's (position, heads) list."""
    return [(PAPER_POSITIONS[g], heads) for g, heads in groups.items()]


def _disagree(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.argmax(-1) != b.argmax(-1)).sum())


# ---------------------------------------------------------------------------------------------
# Circuit evaluation by mean ablation

# Groups at all three positions of a 4-layer, 4-head model; a head may sit in several groups.
CIRCUIT = {
    "value_fetcher": [(3, 0), (2, 1), (3, 2)],
    "pos_transmitter": [(2, 3), (1, 0)],
    "pos_detector": [(1, 2), (0, 1), (2, 2)],
    "struct_reader": [(0, 3), (1, 1), (0, 0)],
}


@pytest.fixture(scope="module")
def ablation():
    """A random model, 32 evaluated prompts and 32 other reference prompts (same length)."""
    model = random_llama(2)
    return model, random_prompts(32, 10), random_prompts(32, 11)


def test_mean_ablation_matches_the_oracle_prompt_by_prompt(ablation):
    """Answers = the oracle's circuit predictions: the package's circuit accuracy must be 1 (its
    argmax equals the oracle's on every prompt). The mistakes the issue lists would each change
    the oracle's argmax on several prompts."""
    model, prompts, reference = ablation
    expected = oracles.mean_ablation_logits(model, prompts, reference, _groups_at(CIRCUIT))
    target = prompts.replace(answers=expected.argmax(-1))
    assert code_circuit_accuracy(model, CIRCUIT, target, reference, batch_size=12) == 1.0

    def mistaken(reference_set, groups):
        return oracles.mean_ablation_logits(model, prompts, reference_set, groups)

    swapped = {"last": "last", "query_label": "prev_query_label", "prev_query_label": "query_label"}
    assert _disagree(expected, mistaken(prompts, _groups_at(CIRCUIT))) >= 5  # means of the evaluated set
    assert _disagree(expected, mistaken(reference, [(swapped[p], h) for p, h in _groups_at(CIRCUIT)])) >= 5
    for drop in range(4):  # any one group not kept
        kept = [g for i, g in enumerate(_groups_at(CIRCUIT)) if i != drop]
        assert _disagree(expected, mistaken(reference, kept)) >= 3
    assert _disagree(expected, oracles.at_last(model(prompts.input_ids), prompts)) >= 20  # nothing ablated


def test_table1_row_matches_the_oracle(ablation):
    """Full accuracy 0.75 (a quarter of the answers are not the model's), circuit accuracy and
    faithfulness = circuit / full as the oracle computes them, all nonzero."""
    model, prompts, reference = ablation
    prompts = with_own_answers(model, prompts, keep_every=4)
    row = code_evaluate(model, CIRCUIT, prompts, reference, n_random=2)
    expected = oracles.table1_row(model, prompts, reference, _groups_at(CIRCUIT))
    assert 0 < expected["circuit"] < expected["full"] < 1
    for key in ("full", "circuit", "faithfulness"):
        assert row[key] == pytest.approx(expected[key], abs=1e-6), key


def test_random_baseline_draws_circuits_of_the_same_group_sizes(ablation):
    """A group holding every head can only be drawn as itself, and an empty group as itself: the
    random baseline must then equal that circuit's oracle accuracy (not the full model's, not
    another circuit's)."""
    model, prompts, reference = ablation
    every = [(layer, head) for layer in range(4) for head in range(4)]
    for groups in (
        {"value_fetcher": every, "pos_detector": every, "struct_reader": []},
        {"value_fetcher": [], "pos_transmitter": [], "pos_detector": every},
    ):
        expected = oracles.mean_ablation_logits(model, prompts, reference, _groups_at(groups))
        target = prompts.replace(answers=expected.argmax(-1))
        row = code_evaluate(model, groups, target, reference, n_random=2)
        assert row["circuit"] == 1.0 and row["random"] == 1.0
        assert row["full"] < 0.5  # the full model disagrees with that circuit


# ---------------------------------------------------------------------------------------------
# Path patching


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def patching(request):
    """A random 4-layer model (MHA, or GQA with 2 kv heads), 10 prompts answered with the
    model's own predictions, and their corruptions (new tokens at the previous query label, the
    query label and one position between)."""
    model = random_llama(1, n_kv_heads=request.param)
    clean = with_own_answers(model, random_prompts(10, 0))
    return model, clean, corrupted(clean, 1)


SENDERS = [(layer, head) for layer in (0, 1) for head in range(4)]  # below every receiver
RECEIVERS = {
    2: [(3, 0), (2, 1)],  # group A candidates, at the last token
    3: [(2, 0), (3, 2)],  # group B candidates, their values at the query label
    4: [(2, 2), (3, 3)],  # group C candidates, their values at the previous query label
}


def _compare(code: torch.Tensor, oracle: dict) -> None:
    """The package's scores equal the oracle's within TOL, the largest is ~100x TOL and most of
    them are well above it."""
    values = torch.tensor(list(oracle.values()))
    assert values.abs().max() > 1e-3
    assert (values.abs() > 10 * TOL).float().mean() >= 0.5
    for (layer, head), expected in oracle.items():
        assert float(code[layer, head]) == pytest.approx(expected, abs=TOL), (layer, head)


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_paper_steps_match_the_oracle(patching, step):
    """Each of the paper's steps, with the package's own choice of sender position and receiver
    kind, against the oracle of the paper's table (A: logits; B: q at the last token; C: v at
    the query label; D: v at the previous query label), for both methods."""
    model, clean, corrupt = patching
    position, kind = PAPER_STEPS[step]
    receivers = RECEIVERS.get(step, [])
    expected = {s: oracles.path_patching_score(model, clean, corrupt, s, position, receivers, kind) for s in SENDERS}
    for method in ("fast", "reference"):
        _compare(code_path_patch_step(model, clean, corrupt, step, receivers, SENDERS, method), expected)


@pytest.mark.parametrize("position", ["last", "query_label", "prev_query_label"])
def test_key_receivers_match_the_oracle(patching, position):
    """Receivers patched through their keys (no paper step uses them), at every sender position."""
    model, clean, corrupt = patching
    receivers = [(2, 1), (3, 3)]
    expected = {s: oracles.path_patching_score(model, clean, corrupt, s, position, receivers, "k") for s in SENDERS}
    _compare(code_path_patch(model, clean, corrupt, position, "k", receivers, SENDERS, "fast"), expected)


def test_receiver_kinds_give_different_scores(patching):
    """The tests above can tell the kinds apart: q, k and v receivers score senders differently."""
    model, clean, corrupt = patching
    sender, receivers = (0, 2), [(2, 0), (3, 2)]
    scores = [oracles.path_patching_score(model, clean, corrupt, sender, "query_label", receivers, k) for k in "qkv"]
    assert min(abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1 :]) > 10 * TOL


# ---------------------------------------------------------------------------------------------
# DCM

DCM_GROUPS = {  # position -> the group's heads (several per layer)
    "last": [(3, 1), (2, 0), (3, 2)],
    "query_label": [(1, 3), (2, 2), (1, 0)],
    "prev_query_label": [(0, 1), (1, 2)],
}


@pytest.fixture(scope="module")
def dcm_pairs():
    """Base and source prompts of other lengths (so each group's position differs between the
    base and the source), and a target token per pair."""
    model = random_llama(3, n_kv_heads=2)
    base, source = random_prompts(12, 30), random_prompts(12, 31)
    assert (base.positions["last"] != source.positions["last"]).any()
    return model, base, source, source.answers


@pytest.mark.parametrize("position", list(DCM_GROUPS))
def test_dcm_logits_and_gradient_match_the_oracle(dcm_pairs, position):
    """At a fractional mask, the package's logits (fast and full forward) and the gradient of the
    mean target logit w.r.t. the mask equal the oracle's; at mask 0 the source values must come
    from the source prompts at their own positions."""
    model, base, source, target = dcm_pairs
    heads = DCM_GROUPS[position]
    rows = torch.arange(len(base))
    values = torch.tensor([0.2, 0.7, 0.45, 0.9])[: len(heads)]

    oracle_mask = values.clone().requires_grad_(True)
    expected = oracles.dcm_logits(model, base, source, position, heads, oracle_mask)
    (expected_grad,) = torch.autograd.grad(expected[rows, target].mean(), oracle_mask)
    for resume in (True, False):
        mask = values.clone().requires_grad_(True)
        logits = code_dcm_logits(model, base, source, target, position, heads, mask, resume)
        torch.testing.assert_close(logits, expected.detach(), atol=TOL, rtol=0)
        (grad,) = torch.autograd.grad(logits[rows, target].mean(), mask)
        torch.testing.assert_close(grad, expected_grad, atol=TOL, rtol=1e-4)
    assert expected_grad.abs().min() > 1e-3

    with torch.no_grad():
        patched = code_dcm_logits(model, base, source, target, position, heads, torch.zeros(len(heads)), True)
        oracle_patched = oracles.dcm_logits(model, base, source, position, heads, torch.zeros(len(heads)))
        from_base = oracles.dcm_logits(model, base, base, position, heads, torch.zeros(len(heads)))
        unpatched = oracles.dcm_logits(model, base, source, position, heads, torch.ones(len(heads)))
    torch.testing.assert_close(patched, oracle_patched, atol=TOL, rtol=0)
    assert (oracle_patched - from_base).abs().max() > 0.1  # source values from the wrong prompts
    assert (oracle_patched - unpatched).abs().max() > 0.1


@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_dcm_first_step_follows_the_oracle_loss(dcm_pairs, lam):
    """One training step on all pairs at once: the package's first loss is the oracle's loss at
    mask 1, and Adam's first step moves each mask by -lr * sign(gradient), so the mask after it
    is clamp(1 - 0.1 * sign(oracle gradient), 0, 1). With lambda = 5 the sparsity term decides
    every sign (all masks stay at 1); a flipped sparsity term would move them all to 0.9."""
    model, base, source, target = dcm_pairs
    position, heads = "last", [(3, 0), (3, 3), (2, 1), (2, 3)]  # gradients of both signs at lambda 0
    mask = torch.ones(len(heads), requires_grad=True)
    loss = oracles.dcm_loss(model, base, source, target, position, heads, mask, lam)
    (grad,) = torch.autograd.grad(loss, mask)
    assert grad.abs().min() > 1e-3
    expected_mask = (1 - 0.1 * grad.sign()).clamp(0, 1)
    if lam == 0:
        assert (expected_mask < 1).any() and (expected_mask == 1).any()  # mixed signs
    else:
        assert (expected_mask == 1).all()

    pairs = (base, source, target)
    result = code_dcm_train(model, heads, position, pairs, pairs, lam, epochs=1, batch_size=len(base))
    assert len(result["losses"]) == 1
    assert result["losses"][0] == pytest.approx(loss.item(), abs=1e-4)
    torch.testing.assert_close(torch.tensor(result["mask"]), expected_mask, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# CMAP


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def two_models(request):
    """A random "fine-tuned" source model and a base model = the source with every weight
    perturbed, and 24 prompts."""
    source = random_llama(5, n_kv_heads=request.param)
    base = copy.deepcopy(source)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in base.parameters():
            if p.ndim >= 2:
                p.add_(0.12 * torch.randn(p.shape, generator=g))
    return base, source, with_own_answers(source, random_prompts(24, 20))


CMAP_SITES = {  # one or several (kind, position, heads) sites; k and v only without GQA
    "z at every position": [
        ("z", "last", [(3, 0), (2, 2)]),
        ("z", "query_label", [(1, 1), (2, 0)]),
        ("z", "prev_query_label", [(0, 2)]),
    ],
    "q at the last token": [("q", "last", [(3, 0), (3, 1), (2, 2)])],
    "q at the query label": [("q", "query_label", [(1, 1), (2, 0)])],
    "k at the query label": [("k", "query_label", [(1, 1), (2, 0)])],
    "v at the query label": [("v", "query_label", [(1, 1), (2, 0)])],
}


@pytest.mark.parametrize("name", list(CMAP_SITES))
def test_cross_model_patch_matches_the_oracle(two_models, name):
    base, source, prompts = two_models
    sites = CMAP_SITES[name]
    if base.cfg.n_key_value_heads is not None and sites[0][0] in "kv":
        with pytest.raises(_et.SetupError, match="grouped-query"):  # a shared kv head has no per-head k / v
            code_cmap_logits(base, source, prompts, sites)
        return
    expected = oracles.cmap_logits(base, source, prompts, sites)
    torch.testing.assert_close(code_cmap_logits(base, source, prompts, sites), expected, atol=TOL, rtol=0)
    with torch.no_grad():
        unpatched = oracles.at_last(base(prompts.input_ids), prompts)
    assert (expected - unpatched).abs().max() > 0.1
    from_base = oracles.cmap_logits(base, base, prompts, sites)  # values read from the wrong model
    assert (expected - from_base).abs().max() > 0.1


@pytest.mark.parametrize("patch", ["z", "q", "qkv"])
def test_cmap_accuracy_matches_the_oracle(two_models, patch):
    """The stage's batched, resumed CMAP: answers = the oracle's patched predictions, so the
    package's patched accuracy must be 1; the base and source accuracies are the oracle's."""
    base, source, prompts = two_models
    groups = {"value_fetcher": [(3, 0), (2, 2)], "pos_detector": [(1, 1), (2, 0)], "struct_reader": [(0, 2)]}
    sites = [(kind, PAPER_POSITIONS[g], heads) for g, heads in groups.items() for kind in patch]  # "qkv": q, k, v
    if base.cfg.n_key_value_heads is not None and patch == "qkv":
        with pytest.raises(_et.SetupError, match="grouped-query"):  # a shared kv head has no per-head k / v
            code_cmap_accuracy(base, source, prompts, groups, patch)
        return
    expected = oracles.cmap_logits(base, source, prompts, sites)
    target = prompts.replace(answers=expected.argmax(-1))
    result = code_cmap_accuracy(base, source, target, groups, patch)
    assert result["patched"] == 1.0
    with torch.no_grad():
        for model in ("base", "source"):
            logits = oracles.at_last({"base": base, "source": source}[model](target.input_ids), target)
            assert result[model] == pytest.approx(oracles.correct(logits, target.answers).float().mean().item())
    assert result["base"] < 0.9  # the patch changes the base model's answers
