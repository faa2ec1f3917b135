"""Attribution (`path_patch(method="attribution")`): the derivative of the exact score along the
corrupt-minus-clean sender output, checked against central finite differences of the exact
fast method on a tiny random LLaMA in float64 (MHA and GQA; no receivers, q/k/v receivers,
position sets); its units follow `relative`; integrated gradients approach the exact score of a
single sender as the steps grow."""

from __future__ import annotations

import pytest
import torch

from et_circuits.core.errors import CircuitError
from et_circuits.core.prepared import PreparedRuns, prepare_runs
from et_circuits.core.settings import RunSettings
from et_circuits.core.types import Receiver
from et_circuits.methods import path_patching as pp
from tests.planted import corrupted, random_llama, random_prompts, with_own_answers

S = RunSettings(batch_size=5)
EPS = 1e-4


def prob64(logits, prompts):
    """The mean answer probability in float64 (the ready metric's softmax is float32, too coarse
    for finite differences)."""
    probs = torch.softmax(logits.double(), dim=-1)
    return probs.gather(-1, prompts.answers.to(probs.device)[:, None]).mean()


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def case(request):
    model = random_llama(seed=4, n_kv_heads=request.param).double()
    model.cfg.dtype = torch.float64
    clean = with_own_answers(model, random_prompts(12, seed=5))
    # A position set: the previous query label and the query label together (-1: one prompt has only one).
    pair = torch.stack([clean.positions["prev_query_label"], clean.positions["query_label"]], 1)
    pair[0, 1] = -1
    clean = clean.replace(positions={**clean.positions, "pair": pair})
    corrupt = corrupted(clean, seed=6)
    corrupt = corrupt.replace(positions=dict(clean.positions))
    runs = prepare_runs(model, clean, corrupt, ["last", "query_label", "pair"], S)
    return model, clean, corrupt, runs


def _moved(runs: PreparedRuns, eps: float) -> PreparedRuns:
    """The prepared runs with every corrupt sender output at clean + eps x (corrupt - clean)."""
    corrupt_z = {
        p: {l: runs.clean_at["z"][p][l] + eps * (z - runs.clean_at["z"][p][l]) for l, z in zs.items()}
        for p, zs in runs.corrupt_z.items()
    }
    return PreparedRuns(runs.run, runs.last_logits, runs.clean_at, corrupt_z)


CASES = {
    "direct at last": ("last", None),
    "q at last": ("last", [Receiver(2, 1, "q", "last"), Receiver(3, 0, "q", "last")]),
    "k and v at a set": (
        "pair",
        [Receiver(3, 2, "k", "pair"), Receiver(2, 0, "v", "pair"), Receiver(3, 3, "q", "last")],
    ),
    "v at the query label": ("query_label", [Receiver(1, 1, "v", "query_label"), Receiver(3, 1, "v", "query_label")]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attribution_is_the_derivative_of_the_exact_score(case, name):
    model, clean, corrupt, runs = case
    sender, receivers = CASES[name]
    kwargs = dict(receivers=receivers, metric=prob64, relative=True, settings=S)
    plus = pp.path_patch(model, clean, corrupt, sender, runs=_moved(runs, EPS), **kwargs).scores.double()
    minus = pp.path_patch(model, clean, corrupt, sender, runs=_moved(runs, -EPS), **kwargs).scores.double()
    derivative = (plus - minus) / (2 * EPS)
    got = pp.path_patch(model, clean, corrupt, sender, runs=runs, method="attribution", **kwargs)
    assert got.method == "attribution" and got.relative and got.n == len(clean)
    assert derivative.abs().max() > 1e-3  # the check is not between zeros
    torch.testing.assert_close(got.scores.double(), derivative, atol=1e-5 * derivative.abs().max(), rtol=1e-4)


def test_units_follow_relative_and_non_senders_are_nan(case):
    model, clean, corrupt, runs = case
    receivers = CASES["q at last"][1]
    kwargs = dict(receivers=receivers, metric=prob64, runs=runs, method="attribution", settings=S)
    rel = pp.path_patch(model, clean, corrupt, "last", relative=True, **kwargs).scores
    absolute = pp.path_patch(model, clean, corrupt, "last", relative=False, **kwargs).scores
    p_clean = float(prob64(runs.last_logits, clean))
    torch.testing.assert_close(rel, absolute / p_clean, atol=1e-7, rtol=1e-5)
    some = pp.path_patch(model, clean, corrupt, "last", senders=[(0, 1), (1, 2)], **kwargs).scores
    assert some.isnan().sum() == some.numel() - 2
    torch.testing.assert_close(some[0, 1], absolute[0, 1], atol=1e-9, rtol=1e-6)
    assert (absolute[3:] == 0).all()  # at or above every receiver's layer: no path
    chunked = pp.path_patch(
        model, clean, corrupt, "last", relative=False, **{**kwargs, "settings": RunSettings(batch_size=2)}
    )
    torch.testing.assert_close(chunked.scores, absolute, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("name", ["direct at last", "k and v at a set"])
def test_integrated_gradients_approach_the_exact_score_of_one_sender(case, name):
    """For a single sender the gradient path moves only its output, so the Riemann sum of
    `ig_steps` points tends to the exact score (error ~ 1/N)."""
    model, clean, corrupt, runs = case
    sender, receivers = CASES[name]
    exact = pp.path_patch(model, clean, corrupt, sender, receivers=receivers, metric=prob64, runs=runs, settings=S)
    head = exact.top(1)[0]
    kwargs = dict(receivers=receivers, metric=prob64, runs=runs, method="attribution", senders=[head], settings=S)
    errors = [
        abs(float(pp.path_patch(model, clean, corrupt, sender, ig_steps=n, **kwargs).scores[head] - exact.scores[head]))
        for n in (1, 8, 64)
    ]
    assert errors[0] > 1e-4  # plain attribution is off (so the test tests)
    assert errors[2] < errors[1] / 4 and errors[2] < errors[0] / 4  # 8x the points: ~1/8 of the error


def test_bad_ig_steps_are_refused(case):
    model, clean, corrupt, runs = case
    with pytest.raises(CircuitError, match="ig_steps"):
        pp.path_patch(model, clean, corrupt, "last", runs=runs, method="attribution", ig_steps=0)
