"""The IOI criteria on top of mean ablation (Wang et al. 2023): minimality and completeness.

F(C) is a circuit's accuracy under mean ablation (`evaluation.ablated_accuracies`). C \\ K is the
circuit without the (group, head) entries K; M \\ K is the full model with only K's heads
mean-ablated, each at its group's positions.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit, Entry
from et_circuits.core.errors import CircuitError
from et_circuits.core.prompts import PromptSet
from et_circuits.core.settings import QUIET, RunSettings

from .evaluation import ablated_accuracies

Score = Callable[[Circuit], float]  # F: a circuit's score (e.g. its accuracy under mean ablation)


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
        candidate = current.without([(group, head)])
        candidate_score = score(candidate)
        removed = abs(candidate_score - current_score) < threshold and candidate_score >= original - threshold
        log.append(
            {"group": group, "head": list(head), "with": current_score, "without": candidate_score, "removed": removed}
        )
        if removed:
            current, current_score = candidate, candidate_score
    return current, log


def completeness(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    n_random: int = 10,
    seed: int = 0,
    settings: RunSettings = QUIET,
) -> list[dict]:
    """F(C \\ K) beside F(M \\ K) for K = each whole group and for `n_random` random subsets of
    the circuit (each entry in K with probability 1/2, never empty). A complete circuit has
    the two close for every K; `gap` = |F(C \\ K) - F(M \\ K)| is IOI's incompleteness.
    Every F(C \\ K), then every F(M \\ K), in shared forwards (`ablated_accuracies`)."""
    entries = circuit.entries()
    rng = random.Random(f"completeness-{seed}")
    subsets: list[tuple[str, str, list[Entry]]] = [
        ("group", g, [(g, h) for h in heads]) for g, heads in circuit.groups.items() if heads
    ]
    for i in range(n_random if entries else 0):
        subset = [e for e in entries if rng.random() < 0.5] or [rng.choice(entries)]
        subsets.append(("random", f"random-{i}", subset))
    rows = []
    if not subsets:
        return rows
    without = ablated_accuracies(model, [circuit.without(s) for _, _, s in subsets], prompts, means, settings)
    model_without = ablated_accuracies(
        model, [circuit.keep_only(s) for _, _, s in subsets], prompts, means, settings, ablate_circuit=True
    )
    for (kind, name, subset), f_circuit, f_model in zip(subsets, without, model_without):
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
