"""The paper's circuit discovery and Table 1 as a recipe: path patching at the paper's positions
(its four steps) or at the positions a position sweep marks, then minimality pruning and
completeness, each on its own seeded prompts; Table 1 evaluates a circuit by mean ablation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.methods.discovery import Step, StepDone, StepLookup, effective_top_k, find_circuit
from et_circuits.methods.evaluation import Evaluation, ablated_accuracy, evaluate_circuit, position_means
from et_circuits.methods.minimality import completeness, minimal
from et_circuits.methods.sweep import Sweep, smallest, sweep

from .. import data
from ..paper import PAPER_STEPS, PAPER_TOP_K
from .sampling import SEED_OFFSETS, path_patching_prompts, prompts

# Where the sweep looks for the task's mechanism: tokens relative to the task's anchors.
SWEEP_POSITIONS: tuple[str, ...] = (
    "objects", "objects+1", "labels", "labels+1", "labels+2", "answer_object", "prev_query_label",
    "prev_query_label+1", "prev_query_label+2", "query_label", "query_label+1", "last",
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


@dataclass
class Discovery:
    """What `discover` finds: the top-k candidates, the circuit after minimality, every step's
    scores, the minimality tests, the completeness rows, and (for the discovered reading) the
    position sweep that chose the positions."""

    candidates: Circuit
    circuit: Circuit
    scores: dict[str, torch.Tensor]
    top_k: tuple[int, ...]
    minimality: list[dict]
    completeness: list[dict]
    sweep: Sweep | None = None


def discover(
    model: HookedTransformer,
    tokenizer,
    reading: str = "paper",
    n: int = 300,
    n_boxes: int = 7,
    seed: int = 0,
    top_k: Sequence[int] = PAPER_TOP_K,
    top_k_cap: float = 0.25,
    method: str = "fast",
    minimality_n: int = 100,
    minimality_threshold: float = 0.03,
    reference_n: int = 500,
    completeness_random: int = 10,
    sweep_n: int = 100,
    mark: float = 0.2,
    settings: RunSettings = QUIET,
    finished: StepLookup | None = None,
    on_step: StepDone | None = None,
    means_cache: str | os.PathLike | None = None,
) -> Discovery:
    """A circuit with minimality pruning and completeness, each on its own seeded prompts.
    `reading` "paper": the paper's four path-patching steps at its positions (`PAPER_STEPS`);
    "discovered": a position sweep over `SWEEP_POSITIONS` on the first `sweep_n` path-patching
    prompts marks where the effect is (its smallest marked positions), then `own_steps` there.
    Top-k is capped for small models; the discovered reading's steps take the first top-k
    numbers in order. `means_cache`: a folder where the ablation means are kept
    (`position_means`)."""
    if reading not in READINGS:
        raise CircuitError(f"unknown reading {reading!r}; expected one of {', '.join(READINGS)}")
    top_k = effective_top_k(top_k, model.cfg.n_layers, model.cfg.n_heads, top_k_cap)
    vocab = data.vocabulary(tokenizer, min_objects=n_boxes, min_labels=n_boxes + 1)
    clean, corrupt = path_patching_prompts(tokenizer, vocab, n, n_boxes, seed + SEED_OFFSETS["path_patching"])
    found_sweep, steps = None, PAPER_STEPS
    if reading == "discovered":
        found_sweep = sweep(model, clean[:sweep_n], corrupt[:sweep_n], SWEEP_POSITIONS, mark=mark, settings=settings)
        steps = own_steps(smallest(found_sweep, clean[:sweep_n]))
        top_k = top_k[: len(steps)]
    candidates, scores = find_circuit(
        model, clean, corrupt, top_k, steps, method=method, settings=settings, finished=finished, on_step=on_step
    )
    reference = prompts(tokenizer, vocab, reference_n, n_boxes, seed + SEED_OFFSETS["reference"])
    means = position_means(model, reference, settings, means_cache)
    batch = prompts(tokenizer, vocab, minimality_n, n_boxes, seed + SEED_OFFSETS["minimality"])
    score = partial(_ablated, model=model, prompts=batch, means=means, settings=settings)
    circuit, log = minimal(candidates, score, minimality_threshold, settings.progress)
    rows = completeness(model, circuit, batch, means, completeness_random, seed, settings)
    return Discovery(candidates, circuit, scores, top_k, log, rows, found_sweep)


def _ablated(circuit: Circuit, model, prompts, means, settings) -> float:
    return ablated_accuracy(model, circuit, prompts, means, settings)


def table1_row(
    model: HookedTransformer,
    tokenizer,
    circuit: Circuit,
    n: int = 500,
    reference_n: int = 500,
    n_random: int = 10,
    n_boxes: int = 7,
    seed: int = 0,
    settings: RunSettings = QUIET,
    means_cache: str | os.PathLike | None = None,
) -> Evaluation:
    """Table 1's columns for one model: `circuit` under mean ablation on its own seeded
    evaluation prompts, means from seeded reference prompts (kept in `means_cache`, as in
    `discover`)."""
    vocab = data.vocabulary(tokenizer, min_objects=n_boxes, min_labels=n_boxes)
    batch = prompts(tokenizer, vocab, n, n_boxes, seed + SEED_OFFSETS["evaluation"])
    reference = prompts(tokenizer, vocab, reference_n, n_boxes, seed + SEED_OFFSETS["reference"])
    means = position_means(model, reference, settings, means_cache)
    return evaluate_circuit(model, circuit, batch, reference, n_random, seed, settings, means)
