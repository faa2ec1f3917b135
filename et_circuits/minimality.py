"""Minimality and completeness of a circuit, the IOI criteria (Wang et al. 2023) on top of
circuit.py's mean-ablation evaluation.

F is the circuit's accuracy under mean ablation (`circuit.circuit_accuracy`); C \\ K is the
circuit without the (group, head) entries K; M \\ K is the full model with only K's heads
mean-ablated, each at its group's position.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Callable

from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .circuit import Circuit, CircuitError, Head, circuit_accuracy, without
from .data import Batch

Score = Callable[[Circuit], float]
Entry = tuple[str, Head]  # (group, head)


def _circuit_score(circuit: Circuit, model, batch, means, batch_size) -> float:
    return circuit_accuracy(model, circuit, batch, means, batch_size)


def circuit_score(
    model: HookedTransformer, batch: Batch, means: Float[Tensor, "layer pos head d"], batch_size: int = 32
) -> Score:
    """F(C): mean-ablation accuracy of a circuit on `batch` (what minimality compares)."""
    return partial(_circuit_score, model=model, batch=batch, means=means, batch_size=batch_size)


def minimal(
    circuit: Circuit,
    score: Score,
    threshold: float = 0.03,
    progress: bool = True,
) -> tuple[Circuit, list[dict]]:
    """Prune each group greedily, in group order and from the end of each group's list (groups
    list their heads most important first, as path patching ranks them).

    Head v of the current circuit C is removed when removing it hardly matters,
    |F(C \\ v) - F(C)| < threshold, and when F(C \\ v) stays within `threshold` of the unpruned
    circuit's F, so the pruned circuit scores at most `threshold` below the original. A kept
    head is one whose removal changed F by at least `threshold` at its turn (IOI's criterion
    with K = the heads already removed). Returns the pruned circuit and one record per test.
    """
    if not 0 <= threshold <= 1:
        raise CircuitError(f"minimality threshold must be in [0, 1], got {threshold}")
    original = score(circuit)
    current, current_score, log = circuit, original, []
    entries = [(g, h) for g, heads in circuit.groups.items() for h in reversed(heads)]
    for group, head in tqdm(entries, desc="minimality", disable=not progress, leave=False):
        candidate = without(current, [(group, head)])
        candidate_score = score(candidate)
        removed = abs(candidate_score - current_score) < threshold and candidate_score >= original - threshold
        log.append(
            {
                "group": group,
                "head": list(head),
                "with": current_score,
                "without": candidate_score,
                "removed": removed,
            }
        )
        if removed:
            current, current_score = candidate, candidate_score
    return current, log


# ---------------------------------------------------------------------------------------------
# Completeness


def model_without(
    model: HookedTransformer,
    knocked: Circuit,
    batch: Batch,
    means: Float[Tensor, "layer pos head d"],
    batch_size: int = 32,
) -> float:
    """F(M \\ K): accuracy of the full model with K's heads mean-ablated at their group's position."""
    return circuit_accuracy(model, knocked, batch, means, batch_size, ablate_circuit=True)


def _only(circuit: Circuit, entries: list[Entry]) -> Circuit:
    keep = set(entries)
    return Circuit({g: [h for h in hs if (g, h) in keep] for g, hs in circuit.groups.items()}, dict(circuit.positions))


def completeness(
    model: HookedTransformer,
    circuit: Circuit,
    batch: Batch,
    means: Float[Tensor, "layer pos head d"],
    n_random: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """F(C \\ K) beside F(M \\ K) for K = each whole group and for `n_random` random subsets of
    the circuit (each entry in K with probability 1/2, never empty). A complete circuit has
    the two close for every K; `gap` = |F(C \\ K) - F(M \\ K)| is IOI's incompleteness."""
    entries = [(g, h) for g, heads in circuit.groups.items() for h in heads]
    rng = random.Random(f"completeness-{seed}")
    subsets: list[tuple[str, str, list[Entry]]] = [
        ("group", g, [(g, h) for h in heads]) for g, heads in circuit.groups.items() if heads
    ]
    for i in range(n_random if entries else 0):
        subset = [e for e in entries if rng.random() < 0.5] or [rng.choice(entries)]
        subsets.append(("random", f"random-{i}", subset))
    rows = []
    for kind, name, subset in tqdm(subsets, desc="completeness", disable=not progress, leave=False):
        f_circuit = circuit_accuracy(model, without(circuit, subset), batch, means, batch_size)
        f_model = model_without(model, _only(circuit, subset), batch, means, batch_size)
        rows.append(
            {
                "kind": kind,
                "name": name,
                "size": len(subset),
                "heads": [[g, *h] for g, h in subset],
                "circuit_without": f_circuit,
                "model_without": f_model,
                "gap": abs(f_circuit - f_model),
            }
        )
    return rows
