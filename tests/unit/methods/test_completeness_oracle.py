"""Completeness against a plain implementation: for each knocked-out set K, F(C \\ K) is the
accuracy with every head mean-ablated except the circuit's other entries at their group's
position, and F(M \\ K) the accuracy of the whole model with only K's entries mean-ablated there."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from et_circuits.methods import minimality
from et_circuits.tasks.entity_tracking.paper import paper_circuit


@torch.no_grad()
def _accuracy_with(model, prompts, means, keep_all: bool, entries, positions) -> float:
    """Accuracy with hook_z replaced by `means` everywhere but `entries` (keep_all False: F(C \\ K)),
    or kept everywhere but `entries` (keep_all True: F(M \\ K)), entries at their group's position."""
    n = len(prompts)

    def hook(act, hook, layer):
        out = act.clone() if keep_all else means[layer][None, : act.shape[1]].expand_as(act).clone()
        for group, (l, h) in entries:
            if l != layer:
                continue
            at = prompts.position(positions[group])
            for b in range(n):
                p = int(at[b])
                out[b, p, h] = means[layer][p, h] if keep_all else act[b, p, h]
        return out

    hooks = [(f"blocks.{l}.attn.hook_z", partial(hook, layer=l)) for l in range(model.cfg.n_layers)]
    logits = model.run_with_hooks(prompts.input_ids, fwd_hooks=hooks)
    last = logits[torch.arange(n), prompts.position("last")]
    return (last.argmax(-1) == prompts.answers).float().mean().item()


def test_completeness_is_f_of_circuit_and_model_without_k(predicted):
    model, batch, means = predicted
    circuit = paper_circuit({"value_fetcher": [(1, 0), (1, 2)], "pos_detector": [(0, 1)], "struct_reader": []})
    found = minimality.completeness(model, circuit, batch, means, n_random=3, seed=1)
    assert [s.kind for s in found.sets] == ["group", "group", "random", "random", "random"]
    changed = 0
    for s in found.sets:
        k = set(s.heads)
        rest = [e for e in circuit.entries() if e not in k]
        f_circuit = _accuracy_with(model, batch, means, False, rest, circuit.positions)
        f_model = _accuracy_with(model, batch, means, True, sorted(k), circuit.positions)
        assert s.circuit_without == pytest.approx(f_circuit, abs=1e-6), s.name
        assert s.model_without == pytest.approx(f_model, abs=1e-6), s.name
        changed += f_circuit != f_model
    assert changed, "every set has F(C \\ K) = F(M \\ K): the test could not tell them apart"
