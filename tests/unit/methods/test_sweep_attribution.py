"""The attribution sweep: its per-head estimate is the derivative of activation patching along
the corrupt-minus-clean `hook_z` (central finite differences of whole patched forwards, float64);
`sweep(method="attribution")` marks only positions the exact sweep confirms, with the exact
sweep's scores there, and keeps every position's estimate."""

from __future__ import annotations

import pytest
import torch

from et_circuits.core.hooks import hook_name
from et_circuits.methods import sweep as sw
from et_circuits.methods.attribution import sweep_attribution
from et_circuits.methods.sweep import Sweep
from tests.planted import corrupted, random_llama, random_prompts, with_own_answers

POSITIONS = ["prev_query_label", "query_label", "last"]


def prob64(logits, prompts):
    probs = torch.softmax(logits.double(), dim=-1)
    return probs.gather(-1, prompts.answers.to(probs.device)[:, None]).mean()


@pytest.fixture(scope="module")
def case():
    model = random_llama(seed=7).double()
    model.cfg.dtype = torch.float64
    clean = with_own_answers(model, random_prompts(10, seed=8))
    return model, clean, corrupted(clean, seed=9)


@torch.no_grad()
def _patched(model, clean, corrupt, position, layer, head, eps):
    """n x the metric with head `layer`.`head`'s z at `position` moved eps of the way to corrupt."""
    _, cache = model.run_with_cache(corrupt.input_ids, names_filter=hook_name("z", layer))
    rows, at = torch.arange(len(clean)), clean.positions[position]

    def move(z, hook):
        z = z.clone()
        z[rows, at, head] = z[rows, at, head] + eps * (cache[hook.name][rows, at, head] - z[rows, at, head])
        return z

    logits = model.run_with_hooks(clean.input_ids, fwd_hooks=[(hook_name("z", layer), move)])
    return float(prob64(logits[rows, clean.positions["last"]], clean)) * len(clean)


def test_sweep_estimate_is_the_derivative_of_activation_patching(case):
    model, clean, corrupt = case
    total, total_clean = sweep_attribution(model, clean, corrupt, POSITIONS, prob64, batch_size=4)
    assert total.shape == (3, 4, 4)
    with torch.no_grad():
        logits = model(clean.input_ids)
    torch.testing.assert_close(
        total_clean, float(prob64(logits[torch.arange(10), clean.positions["last"]], clean)) * 10
    )
    eps, checked = 1e-4, []
    for i, position in enumerate(POSITIONS):
        for layer, head in [(0, 1), (2, 3), (3, 0)]:
            fd = (
                _patched(model, clean, corrupt, position, layer, head, eps)
                - _patched(model, clean, corrupt, position, layer, head, -eps)
            ) / (2 * eps)
            checked.append(fd)
            assert abs(float(total[i, layer, head]) - fd) <= 1e-6 * max(1.0, abs(fd))
    assert max(map(abs, checked)) > 1e-3  # not all zeros


def test_attribution_sweep_is_confirmed_by_the_exact_sweep(case):
    model, clean, corrupt = case
    screened = sw.sweep(model, clean, corrupt, POSITIONS, metric=prob64, relative=True, mark=0.3, method="attribution")
    assert screened.method == "attribution" and screened.swept == POSITIONS and screened.estimate.shape == (3, 4)
    proposed = screened.positions
    assert set(screened.marked) <= set(proposed) <= set(POSITIONS)
    strength = screened.estimate.abs().amax(1)
    assert proposed == [p for p, s in zip(POSITIONS, strength.tolist()) if s >= 0.3 * float(strength.max())]
    exact = sw.sweep(model, clean, corrupt, proposed, metric=prob64, relative=True, mark=0.3)
    torch.testing.assert_close(screened.layers, exact.layers)
    assert screened.marked == exact.marked and screened.heads.keys() == exact.heads.keys()
    again = Sweep.from_json(screened.to_json())
    assert again.method == "attribution" and again.swept == POSITIONS
    torch.testing.assert_close(again.estimate, screened.estimate, atol=1e-6, rtol=0)
