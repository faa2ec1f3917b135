"""Circuit evaluation by mean ablation (the paper's Table 1), and the IOI criteria built on it
(Wang et al. 2023): minimality and completeness.

F(C), a circuit's accuracy: every head's `hook_z` at every position is replaced by its
position-wise mean over a reference prompt set, except each group's heads at that group's
positions, which keep their own value. The random baseline draws circuits of the same group
sizes and positions uniformly at random; faithfulness = F(C) / full accuracy. C \\ K is the
circuit without the (group, head) entries K; M \\ K is the full model with only K's heads
mean-ablated, each at its group's positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .circuit import Circuit, Entry
from .errors import CircuitError, DataError
from .hooks import mean_activations, replace_hooks
from .metrics import accuracy
from .prompts import PromptSet
from .settings import QUIET, RunSettings

Score = Callable[[Circuit], float]


def keep_mask(circuit: Circuit, prompts: PromptSet, n_layers: int, n_heads: int) -> Bool[Tensor, "layer batch pos head"]:
    """True where a head keeps its own activation: a group's heads at that group's positions.
    Everything else is mean-ablated."""
    keep = torch.zeros(n_layers, len(prompts), prompts.seq_len, n_heads, dtype=torch.bool)
    for g in circuit.groups:
        m = circuit.mask(g, n_layers, n_heads)  # layer head
        if not m.any():
            continue
        for spec in circuit.positions_of(g):
            at = prompts.position_set(spec).cpu()
            rows = torch.arange(len(prompts))[:, None].expand_as(at)
            valid = at >= 0
            keep[:, rows[valid], at[valid], :] |= m[:, None, :]
    return keep


def position_means(model: HookedTransformer, reference: PromptSet, settings: RunSettings = QUIET) -> Float[Tensor, "layer pos head d"]:
    """Position-wise mean of every head's hook_z over the reference prompts (which must be as
    long as the prompts they ablate)."""
    return mean_activations(model, reference.input_ids, "z", settings.batch_size)


def ablated_accuracy(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    settings: RunSettings = QUIET,
    ablate_circuit: bool = False,
) -> float:
    """F(C): accuracy with every head outside the circuit (or off its group's positions)
    replaced by its position-wise mean. With `ablate_circuit`, the complement: only the
    circuit's heads at their groups' positions are mean-ablated (F(M \\ C))."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    circuit.validate(n_layers, n_heads)
    if means.shape[1] < prompts.seq_len:
        raise DataError(f"the reference prompts ({means.shape[1]} tokens) are shorter than the prompts ({prompts.seq_len})")

    def hooks_for(chunk: PromptSet):
        keep = keep_mask(circuit, chunk.to("cpu"), n_layers, n_heads)
        keep = ~keep if ablate_circuit else keep
        return replace_hooks("z", means.to(model.cfg.device), keep.to(model.cfg.device))

    return accuracy(model, prompts, hooks_for, RunSettings(settings.batch_size, settings.max_rows, progress=False))


def random_circuit(circuit: Circuit, n_layers: int, n_heads: int, rng: random.Random) -> Circuit:
    """A circuit with the same group sizes and positions, heads drawn uniformly at random."""
    all_heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    return Circuit({g: rng.sample(all_heads, len(hs)) for g, hs in circuit.groups.items()}, dict(circuit.positions))


def slot_share(circuit: Circuit, prompts: PromptSet, n_layers: int, n_heads: int) -> float:
    """The share of (head, position) slots the circuit keeps, over the positions it acts at
    (every head at each position some group acts at), averaged over the prompts."""
    keep = keep_mask(circuit, prompts, n_layers, n_heads)  # layer batch pos head
    at = keep.any(-1).any(0)  # batch pos: positions the circuit acts at
    slots = at.sum(1) * n_layers * n_heads
    used = keep.sum((0, 3)).sum(1)
    share = torch.where(slots > 0, used / slots.clamp(min=1), torch.zeros_like(used, dtype=torch.float))
    return share.float().mean().item()


@dataclass
class Evaluation:
    """Table 1's columns for one model and circuit; `slots`: the circuit's share of the
    (head, position) slots at its positions (`slot_share`)."""

    full: float
    circuit: float
    random: float
    faithfulness: float
    slots: float

    def as_row(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


def evaluate_circuit(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    reference: PromptSet,
    n_random: int = 10,
    seed: int = 0,
    settings: RunSettings = QUIET,
) -> Evaluation:
    """Full accuracy, circuit accuracy (means over `reference`), mean random-circuit accuracy
    over `n_random` draws, and faithfulness = circuit / full."""
    means = position_means(model, reference, settings)
    quiet = RunSettings(settings.batch_size, settings.max_rows, progress=False)
    full = accuracy(model, prompts, settings=quiet)
    circ = ablated_accuracy(model, circuit, prompts, means, settings)
    rng = random.Random(seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    rand = [
        ablated_accuracy(model, random_circuit(circuit, n_layers, n_heads, rng), prompts, means, settings)
        for _ in range(n_random)
    ]
    rand_mean = sum(rand) / len(rand) if rand else float("nan")
    slots = slot_share(circuit, prompts, n_layers, n_heads)
    return Evaluation(full, circ, rand_mean, circ / full if full else float("nan"), slots)


# ---------------------------------------------------------------------------------------------
# Minimality and completeness


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
    the two close for every K; `gap` = |F(C \\ K) - F(M \\ K)| is IOI's incompleteness."""
    entries = circuit.entries()
    rng = random.Random(f"completeness-{seed}")
    subsets: list[tuple[str, str, list[Entry]]] = [
        ("group", g, [(g, h) for h in heads]) for g, heads in circuit.groups.items() if heads
    ]
    for i in range(n_random if entries else 0):
        subset = [e for e in entries if rng.random() < 0.5] or [rng.choice(entries)]
        subsets.append(("random", f"random-{i}", subset))
    rows = []
    for kind, name, subset in tqdm(subsets, desc="completeness", disable=not settings.progress, leave=False):
        f_circuit = ablated_accuracy(model, circuit.without(subset), prompts, means, settings)
        f_model = ablated_accuracy(model, circuit.keep_only(subset), prompts, means, settings, ablate_circuit=True)
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
