"""The paper's circuit discovery and Table 1 as a recipe: path patching at the paper's positions
(its four steps) or at the positions a position sweep marks, then minimality pruning and
completeness, each on its own seeded prompts; Table 1 evaluates a circuit by mean ablation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.methods.discovery import (
    FoundCircuit,
    Step,
    StepDone,
    StepLookup,
    effective_top_k,
    find_circuit,
)
from et_circuits.methods.evaluation import Evaluation, ablated_accuracy, evaluate_circuit, position_means
from et_circuits.methods.minimality import Completeness, Minimality, completeness, minimal
from et_circuits.methods.sweep import Sweep, smallest, sweep

from .. import data
from ..paper import PAPER_STEPS, PAPER_TOP_K, TOP_K_CAP
from .sampling import SEED_OFFSETS, path_patching_prompts, prompts

# Where the sweep looks for the task's mechanism: tokens relative to the task's anchors.
SWEEP_POSITIONS: tuple[str, ...] = (
    "objects",
    "objects+1",
    "labels",
    "labels+1",
    "labels+2",
    "answer_object",
    "prev_query_label",
    "prev_query_label+1",
    "prev_query_label+2",
    "query_label",
    "query_label+1",
    "last",
)
READINGS = ("paper", "discovered")  # the circuit at the paper's positions, and at discovered ones


def own_steps(positions: Sequence[str]) -> tuple[Step, ...]:
    """Discovery at the positions a sweep found: A and B at the last token as in the paper (A on
    the logits, B through A's queries), and, when the sweep marked earlier positions, one group
    there whose outputs the value fetchers read through their keys and values ("binder")."""
    earlier = tuple(p for p in positions if p != "last")
    steps = PAPER_STEPS[:2]
    if earlier:
        steps += (Step("binder", earlier if len(earlier) > 1 else earlier[0], "kv", PAPER_STEPS[0].group),)
    return steps


@dataclass(frozen=True)
class CircuitPlan:
    """Every setting of the paper's circuit discovery (`discover`) and Table 1 (`table1_row`):
    prompt counts, boxes, seed, top-k (capped to `top_k_cap` of all heads), path-patching
    method (and an optional attribution screen), minimality threshold, the sweep's prompts and
    mark. The defaults are the paper's (exact path patching for every sender)."""

    n: int = 300  # path-patching prompts
    n_boxes: int = 7
    seed: int = 0
    top_k: tuple[int, ...] = PAPER_TOP_K
    top_k_cap: float = TOP_K_CAP
    method: str = "fast"
    screen: int | None = None  # exact scores for the N senders attribution ranks first (None: all)
    ig_steps: int = 1  # attribution's gradient points when screening
    minimality_n: int = 100
    minimality_threshold: float = 0.03
    reference_n: int = 500  # prompts the ablation means are taken over
    completeness_random: int = 10
    sweep_n: int = 100
    mark: float = 0.2
    evaluation_n: int = 500  # Table 1's prompts
    n_random: int = 10  # Table 1's random circuits


@dataclass(frozen=True)
class Discovery:
    """What `discover` finds: the top-k candidates and every step's path patching (`found`),
    the circuit after minimality and the minimality tests (`minimality`), the completeness of
    the pruned circuit, and (for the discovered reading) the position sweep that chose the
    positions."""

    found: FoundCircuit
    minimality: Minimality
    completeness: Completeness
    sweep: Sweep | None = None

    __hash__ = None

    @property
    def candidates(self) -> Circuit:
        return self.found.circuit

    @property
    def circuit(self) -> Circuit:
        return self.minimality.circuit

    @property
    def top_k(self) -> tuple[int, ...]:
        return self.found.top_k

    def __repr__(self) -> str:
        return f"Discovery({self.circuit!r}; {len(self.candidates)} candidates, {self.completeness!r})"


def discover(
    model: HookedTransformer,
    tokenizer,
    reading: str = "paper",
    plan: CircuitPlan = CircuitPlan(),
    *,
    settings: RunSettings = QUIET,
    finished: StepLookup | None = None,
    on_step: StepDone | None = None,
    means_cache: str | os.PathLike | None = None,
) -> Discovery:
    """A circuit with minimality pruning and completeness, each on its own seeded prompts.
    `reading` "paper": the paper's four path-patching steps at its positions (`PAPER_STEPS`);
    "discovered": a position sweep over `SWEEP_POSITIONS` on the first `plan.sweep_n`
    path-patching prompts marks where the effect is (its smallest marked positions), then
    `own_steps` there. Top-k is capped for small models; the discovered reading's steps take
    the first top-k numbers in order. `finished` / `on_step`: `find_circuit`'s. `means_cache`:
    a folder where the ablation means are kept (`position_means`)."""
    if reading not in READINGS:
        raise CircuitError(f"unknown reading {reading!r}; expected one of {', '.join(READINGS)}")
    top_k = effective_top_k(plan.top_k, model.cfg.n_layers, model.cfg.n_heads, plan.top_k_cap)
    n_boxes, seed = plan.n_boxes, plan.seed
    vocab = data.vocabulary(tokenizer, min_objects=n_boxes, min_labels=n_boxes + 1)
    clean, corrupt = path_patching_prompts(tokenizer, vocab, plan.n, n_boxes, seed + SEED_OFFSETS["path_patching"])
    found_sweep, steps = None, PAPER_STEPS
    if reading == "discovered":
        few = slice(0, plan.sweep_n)
        found_sweep = sweep(model, clean[few], corrupt[few], SWEEP_POSITIONS, mark=plan.mark, settings=settings)
        steps = own_steps(smallest(found_sweep, clean[few]))
        top_k = top_k[: len(steps)]
    found = find_circuit(
        model,
        clean,
        corrupt,
        top_k,
        steps,
        method=plan.method,
        screen=plan.screen,
        ig_steps=plan.ig_steps,
        settings=settings,
        finished=finished,
        on_step=on_step,
    )
    reference = prompts(tokenizer, vocab, plan.reference_n, n_boxes, seed + SEED_OFFSETS["reference"])
    means = position_means(model, reference, settings=settings, cache_dir=means_cache)
    batch = prompts(tokenizer, vocab, plan.minimality_n, n_boxes, seed + SEED_OFFSETS["minimality"])
    score = partial(_ablated, model=model, prompts=batch, means=means, settings=settings)
    pruned = minimal(found.circuit, score, threshold=plan.minimality_threshold, progress=settings.progress)
    complete = completeness(
        model, pruned.circuit, batch, means, n_random=plan.completeness_random, seed=seed, settings=settings
    )
    return Discovery(found, pruned, complete, found_sweep)


def _ablated(circuit: Circuit, model, prompts, means, settings) -> float:
    return ablated_accuracy(model, circuit, prompts, means, settings=settings)


def table1_row(
    model: HookedTransformer,
    tokenizer,
    circuit: Circuit,
    plan: CircuitPlan = CircuitPlan(),
    *,
    settings: RunSettings = QUIET,
    means_cache: str | os.PathLike | None = None,
) -> Evaluation:
    """Table 1's columns for one model: `circuit` under mean ablation on its own seeded
    evaluation prompts (`plan.evaluation_n`), means from seeded reference prompts (kept in
    `means_cache`, as in `discover`), `plan.n_random` random circuits."""
    n_boxes, seed = plan.n_boxes, plan.seed
    vocab = data.vocabulary(tokenizer, min_objects=n_boxes, min_labels=n_boxes)
    batch = prompts(tokenizer, vocab, plan.evaluation_n, n_boxes, seed + SEED_OFFSETS["evaluation"])
    reference = prompts(tokenizer, vocab, plan.reference_n, n_boxes, seed + SEED_OFFSETS["reference"])
    means = position_means(model, reference, settings=settings, cache_dir=means_cache)
    return evaluate_circuit(
        model, circuit, batch, reference, n_random=plan.n_random, seed=seed, settings=settings, means=means
    )
