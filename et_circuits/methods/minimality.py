"""The IOI criteria on top of mean ablation (Wang et al. 2023): minimality and completeness.

F(C) is a circuit's score under mean ablation (`evaluation.ablated_scores`; accuracy unless
another metric is given). C \\ K is the
circuit without the (group, head) entries K; M \\ K is the full model with only K's heads
mean-ablated, each at its group's positions.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit, Entry
from et_circuits.core.errors import CircuitError
from et_circuits.core.metrics import Metric, accuracy, metric_name
from et_circuits.core.prompts import PromptSet
from et_circuits.core.serial import frame, head_text, number
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Head

from .evaluation import ablated_scores

Score = Callable[[Circuit], float]  # F: a circuit's score (e.g. its accuracy under mean ablation)


@dataclass(frozen=True)
class PruningTest:
    """One minimality test: F of the current circuit with and without (group, head), and
    whether the head was removed."""

    group: str
    head: Head
    with_: float
    without: float
    removed: bool

    def to_json(self) -> dict:
        return {
            "group": self.group,
            "head": list(self.head),
            "with": self.with_,
            "without": self.without,
            "removed": self.removed,
        }

    @classmethod
    def from_json(cls, d: dict) -> PruningTest:
        return cls(d["group"], tuple(d["head"]), d["with"], d["without"], d["removed"])


@dataclass(frozen=True)
class Minimality:
    """What `minimal` did: the circuit it was given, the pruned circuit, the threshold, and
    every test in order."""

    original: Circuit
    circuit: Circuit
    threshold: float
    tests: tuple[PruningTest, ...]

    __hash__ = None

    def to_frame(self):
        rows = [
            {
                "group": t.group,
                "layer": t.head[0],
                "head": t.head[1],
                "with": t.with_,
                "without": t.without,
                "removed": t.removed,
            }
            for t in self.tests
        ]
        return frame(rows, ["group", "layer", "head", "with", "without", "removed"])

    def to_json(self) -> dict:
        return {
            "original": self.original.to_dict(),
            "circuit": self.circuit.to_dict(),
            "threshold": self.threshold,
            "tests": [t.to_json() for t in self.tests],
        }

    @classmethod
    def from_json(cls, d: dict) -> Minimality:
        return cls(
            Circuit.from_dict(d["original"]),
            Circuit.from_dict(d["circuit"]),
            d["threshold"],
            tuple(PruningTest.from_json(t) for t in d["tests"]),
        )

    def __repr__(self) -> str:
        removed = [f"{t.group}:{head_text(t.head)}" for t in self.tests if t.removed]
        return (
            f"Minimality(kept {len(self.circuit)} of {len(self.original)} heads at threshold "
            f"{self.threshold}; removed: {' '.join(removed) or 'none'})"
        )


def minimal(
    circuit: Circuit,
    score: Score,
    *,
    threshold: float = 0.03,
    progress: bool = False,
) -> Minimality:
    """Prune each group greedily, in group order and from the end of each group's list (groups
    list their heads most important first, as path patching ranks them). `score(circuit)` is F,
    e.g. `partial(ablated_accuracy, model, prompts=..., means=...)` with the circuit first.

    Head v of the current circuit C is removed when removing it hardly matters,
    |F(C \\ v) - F(C)| < threshold, and when F(C \\ v) stays within `threshold` of the unpruned
    circuit's F, so the pruned circuit scores at most `threshold` below the original. A kept
    head is one whose removal changed F by at least `threshold` at its turn (IOI's criterion
    with K = the heads already removed). Returns a `Minimality`: the pruned circuit and every
    test.
    """
    if not 0 <= threshold <= 1:
        raise CircuitError(f"minimality threshold must be in [0, 1], got {threshold}")
    original = score(circuit)
    current, current_score, tests = circuit, original, []
    entries = [(g, h) for g, heads in circuit.groups.items() for h in reversed(heads)]
    for group, head in tqdm(entries, desc="minimality", disable=not progress, leave=False):
        candidate = current.without([(group, head)])
        candidate_score = score(candidate)
        removed = abs(candidate_score - current_score) < threshold and candidate_score >= original - threshold
        tests.append(PruningTest(group, tuple(head), current_score, candidate_score, removed))
        if removed:
            current, current_score = candidate, candidate_score
    return Minimality(circuit, current, threshold, tuple(tests))


@dataclass(frozen=True)
class AblatedSet:
    """One knocked-out set K of `completeness`: its kind ("group" or "random"), name and
    (group, head) entries; F(C \\ K), F(M \\ K) and their gap."""

    kind: str
    name: str
    heads: tuple[Entry, ...]
    circuit_without: float
    model_without: float

    @property
    def gap(self) -> float:
        return abs(self.circuit_without - self.model_without)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "size": len(self.heads),
            "heads": [[g, *h] for g, h in self.heads],
            "circuit_without": self.circuit_without,
            "model_without": self.model_without,
            "gap": self.gap,
        }

    @classmethod
    def from_json(cls, d: dict) -> AblatedSet:
        return cls(
            d["kind"], d["name"], tuple((g, (l, h)) for g, l, h in d["heads"]), d["circuit_without"], d["model_without"]
        )


@dataclass(frozen=True)
class Completeness:
    """F(C \\ K) beside F(M \\ K) for every knocked-out set K (`completeness`); a complete
    circuit has the two close for every K."""

    sets: tuple[AblatedSet, ...]
    metric: str = "accuracy"

    def to_frame(self):
        rows = [{k: v for k, v in s.to_json().items() if k != "heads"} for s in self.sets]
        return frame(rows, ["kind", "name", "size", "circuit_without", "model_without", "gap"])

    def to_json(self) -> dict:
        return {"metric": self.metric, "rows": [s.to_json() for s in self.sets]}

    @classmethod
    def from_json(cls, d: dict) -> Completeness:
        return cls(tuple(AblatedSet.from_json(r) for r in d["rows"]), d.get("metric", "accuracy"))

    def __repr__(self) -> str:
        worst = max(self.sets, key=lambda s: s.gap, default=None)
        largest = f"largest gap {number(worst.gap)} ({worst.name})" if worst else "no sets"
        return f"Completeness({len(self.sets)} sets, {largest}; {self.metric})"


def completeness(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    *,
    metric: Metric = accuracy,
    n_random: int = 10,
    seed: int = 0,
    settings: RunSettings = QUIET,
) -> Completeness:
    """F(C \\ K) beside F(M \\ K) for K = each whole group and for `n_random` random subsets of
    the circuit (each entry in K with probability 1/2, never empty; drawn with `seed`), F being
    `metric` under mean ablation with `means`. A complete circuit has the two close for every
    K; the gap |F(C \\ K) - F(M \\ K)| is IOI's incompleteness. Every F(C \\ K), then every
    F(M \\ K), in shared forwards (`ablated_scores`)."""
    entries = circuit.entries()
    rng = random.Random(f"completeness-{seed}")
    subsets: list[tuple[str, str, list[Entry]]] = [
        ("group", g, [(g, h) for h in heads]) for g, heads in circuit.groups.items() if heads
    ]
    for i in range(n_random if entries else 0):
        subset = [e for e in entries if rng.random() < 0.5] or [rng.choice(entries)]
        subsets.append(("random", f"random-{i}", subset))
    name = metric_name(metric)
    if not subsets:
        return Completeness((), name)
    scored = dict(metric=metric, settings=settings)
    without = ablated_scores(model, [circuit.without(s) for _, _, s in subsets], prompts, means, **scored)
    model_without = ablated_scores(
        model, [circuit.keep_only(s) for _, _, s in subsets], prompts, means, ablate_circuit=True, **scored
    )
    return Completeness(
        tuple(
            AblatedSet(kind, label, tuple(subset), f_circuit, f_model)
            for (kind, label, subset), f_circuit, f_model in zip(subsets, without, model_without)
        ),
        name,
    )
