"""The paper's protocol on entity tracking, as short recipes over the task-neutral methods:
the four-step circuit discovery with minimality and completeness, Table 1, the DCM runs behind
Figure 2, the CMAP head sets of Figure 3, and the attention-knockout edges.

Every prompt set is drawn with `seed + SEED_OFFSETS[purpose]`, so the sets of different
purposes differ and a rerun with the same seed reproduces them.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

import torch
from transformer_lens import HookedTransformer

import et_circuits.component_masking as dcm_method
from ..circuit import Circuit
from ..cross_model import INPUT_PATCHES, CmapResult, Variant
from ..errors import CircuitError, DataError
from ..evaluation import Evaluation, ablated_accuracy, completeness, evaluate_circuit, minimal, position_means
from ..attention_knockout import Edge
from ..path_patching import PAPER_STEPS, Step, StepDone, StepLookup, effective_top_k, find_circuit
from ..position_sweep import Sweep, smallest, sweep
from ..prompts import PromptSet, Spec
from ..settings import QUIET, RunSettings
from ..types import GROUPS, Head, letter
from . import data, desiderata

# Each purpose draws its prompts with seed + offset, apart from the others.
SEED_OFFSETS = {
    "path_patching": 0,
    "minimality": 1,
    "reference": 2,
    "evaluation": 3,
    "dcm": 4,
    "cmap": 5,
    "knockout": 6,
}
PAPER_TOP_K = (20, 5, 10, 5)  # Llama-7B; Goat and FLoat used (50, 20, 30, 5)


def prompts(tokenizer, vocab: data.Vocabulary, n: int, n_boxes: int, seed: int) -> PromptSet:
    """`n` seeded prompts with a random query each."""
    return data.make_prompts(tokenizer, data.sample_prompts(vocab, n, n_boxes, seed))


def path_patching_prompts(
    tokenizer, vocab: data.Vocabulary, n: int, n_boxes: int = 7, seed: int = 0
) -> tuple[PromptSet, PromptSet]:
    """`n` seeded clean prompts and their corruptions (same length, so positions line up)."""
    clean = data.sample_prompts(vocab, n, n_boxes, seed)
    rng = random.Random(f"path-patching-corruption-{seed}")
    corrupt = [data.path_patching_corruption(s, rng, vocab) for s in clean]
    return data.make_prompts(tokenizer, clean), data.make_prompts(tokenizer, corrupt)


# ---------------------------------------------------------------------------------------------
# Circuit discovery


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


# ---------------------------------------------------------------------------------------------
# DCM (Figure 2)

EXTRA_GROUP = "pos_transmitter"  # the group the extra desiderata test (group B)


@dataclass(frozen=True)
class DCMPlan:
    """What every DCM training of a run shares: settings, split sizes, boxes, seeds."""

    config: dcm_method.DCMConfig = dcm_method.DCMConfig()
    sizes: tuple[int, int, int] = desiderata.SPLIT_SIZES
    n_boxes: int = 7
    data_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    resamples: int = 10
    resample_seed: int = 0

    def key(self, ask: "Ask", seed: int) -> str:
        """A string naming everything one seed's training depends on (for reuse across reruns)."""
        c = self.config
        return json.dumps(
            {
                "heads": [list(h) for h in ask.heads], "position": ask.position, "desideratum": ask.desideratum,
                "seed": seed, "lam": c.lam, "lr": c.lr, "epochs": c.epochs, "batch_size": c.batch_size,
                "sizes": list(self.sizes), "n_boxes": self.n_boxes, "data_seed": self.data_seed,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class Ask:
    """One DCM question of the paper: a group's heads at its position (or position set), on one
    desideratum."""

    heads: tuple[Head, ...]
    position: Spec
    desideratum: str


def asks_for(circuit: Circuit, desiderata_of: Mapping[str, Sequence[str]]) -> list[tuple[str, Ask]]:
    """(group, ask) for every group of `circuit` in `desiderata_of` and each of its desiderata,
    at the group's own positions."""
    return [
        (group, Ask(tuple(sorted(heads)), circuit.positions[group], name))
        for group, heads in circuit.groups.items()
        for name in desiderata_of.get(group, ())
    ]


def seed_to_json(result: dcm_method.SeedResult) -> dict:
    return {
        "heads": [list(h) for h in result.heads],
        "mask": result.mask,
        "eval_accuracy": result.eval_accuracy,
        "test_accuracy": result.test_accuracy,
        "test_correct": "".join("1" if c else "0" for c in result.test_correct.tolist()),
        "best_step": result.best_step,
        "steps": result.steps,
        "seconds": result.seconds,
    }


def seed_from_json(d: Mapping) -> dcm_method.SeedResult:
    return dcm_method.SeedResult(
        [tuple(h) for h in d["heads"]], list(d["mask"]), d["eval_accuracy"], d["test_accuracy"],
        torch.tensor([c == "1" for c in d["test_correct"]]), d["best_step"], d["steps"], d.get("seconds", 0.0),
    )


def run_dcm(
    model: HookedTransformer,
    tokenizer,
    asks: Sequence[Ask],
    plan: DCMPlan = DCMPlan(),
    settings: RunSettings = QUIET,
    done: Mapping[str, Mapping] | None = None,
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[Ask, dcm_method.DCMResult]:
    """DCM for every ask with the paper's protocol. Pairs come from `draw_splits(...,
    plan.data_seed)`: every desideratum shares the same base prompts (tokenized and run once);
    the test pairs are fixed, and each seed splits the train + eval pairs anew. `done` maps
    `plan.key(ask, seed)` to finished seed results (JSON, as `on_result` receives them), which
    are reused instead of retrained."""
    asks = list(dict.fromkeys(asks))
    done = dict(done or {})
    pending = [a for a in asks if any(plan.key(a, s) not in done for s in plan.seeds)]
    vocab = data.vocabulary(tokenizer, min_objects=plan.n_boxes, min_labels=plan.n_boxes)
    n_train, n_eval, _ = plan.sizes
    pairs: dict[str, tuple[dcm_method.Pairs, dcm_method.Pairs]] = {}
    bases = None
    for name in dict.fromkeys(a.desideratum for a in pending):
        splits = desiderata.draw_splits(desiderata.builder(name), vocab, plan.sizes, plan.n_boxes, plan.data_seed)
        parts = (splits.train + splits.eval, splits.test)
        if bases is None:  # the same base prompts for every desideratum: one tokenization
            bases = [([p.base for p in part], data.make_prompts(tokenizer, [p.base for p in part])) for part in parts]
        pairs[name] = tuple(desiderata.tokenize_pairs(tokenizer, part, b) for part, b in zip(parts, bases))
    questions = [dcm_method.Question(a.heads, a.position, *pairs[a.desideratum]) for a in pending]

    def finished(i: int, seed: int):
        found = done.get(plan.key(pending[i], seed))
        return seed_from_json(found) if found is not None else None

    def saved(i: int, seed: int, result: dcm_method.SeedResult) -> None:
        if on_result is not None:
            on_result(plan.key(pending[i], seed), seed_to_json(result))

    computed = dcm_method.dcm_many(
        model, questions, n_train, n_eval, plan.seeds, plan.config, plan.resamples, plan.resample_seed, settings,
        finished, saved,
    )
    results = dict(zip(pending, computed))
    for a in asks:
        if a not in results:  # every seed finished earlier
            seeds = {s: seed_from_json(done[plan.key(a, s)]) for s in plan.seeds}
            results[a] = dcm_method.summarize(a.heads, a.position, seeds, plan.resamples, plan.resample_seed)
    return {a: results[a] for a in asks}


def dcm_entry(result: dcm_method.DCMResult) -> dict:
    """One (group, desideratum) of dcm.json."""
    return {
        "heads": [list(h) for h in result.selected],
        "selected_seed": result.selected_seed,
        "accuracy": result.accuracy,
        "accuracy_mean": result.accuracy_mean,
        "accuracy_std": result.accuracy_std,
        "test_accuracy_mean": result.test_accuracy_mean,
        "test_accuracy_std": result.test_accuracy_std,
        "seeds": {
            str(s): {k: v for k, v in seed_to_json(r).items() if k not in ("test_correct", "seconds")}
            for s, r in result.seeds.items()
        },
    }


# ---------------------------------------------------------------------------------------------
# CMAP (Figure 3)

# The paper's head sets: per group, the DCM desideratum whose selected heads are patched
# (None: the whole group), plus the full circuit.
SET_DESIDERATA: dict[str, str | None] = {
    "value_fetcher": "object_value",
    "pos_transmitter": "positional",
    "pos_detector": "positional",
    "struct_reader": None,
}
FULL = "full"
SET_ORDER = ("D", "C", "B", "A", FULL)  # the paper's bar order
SET_NAMES = tuple(GROUPS[g].letter for g in SET_DESIDERATA) + (FULL,)


def cmap_head_sets(
    circuit: Circuit, selected: Mapping[str, Mapping[str, Sequence[Head]]] | None
) -> dict[str, Circuit]:
    """The paper's sets, each a circuit of one group (or the whole circuit): A = DCM
    object-value heads of the value fetchers, B / C = DCM positional heads of the position
    transmitters / detectors, D = the whole structure-reader group, and the full circuit.
    `selected[group][desideratum]` are DCM's heads; a group DCM selected nothing for gets an
    empty set (reported as such, not patched); so do A-C without DCM results (None). Only the
    circuit's groups get a set: a group outside the paper's table (a discovered one) is patched
    whole, under its own name."""
    sets: dict[str, Circuit] = {}
    for group in [*(g for g in SET_DESIDERATA if g in circuit.groups), *(g for g in circuit.groups if g not in SET_DESIDERATA)]:
        desideratum = SET_DESIDERATA.get(group)
        if desideratum is None:
            heads = list(circuit.groups[group])
        elif selected is None:
            heads = []
        else:
            try:
                heads = [tuple(h) for h in selected[group][desideratum]]
            except KeyError:
                raise CircuitError(f"no DCM {desideratum} heads for group {group!r}") from None
        positions = {group: circuit.positions[group]} if group in circuit.positions else {}
        sets[letter(group)] = Circuit({group: heads}, positions)
    sets[FULL] = circuit
    return sets


def variants(
    head_sets: Mapping[str, Circuit],
    output_sets: Sequence[str] | None = None,
    input_sets: Sequence[str] = ("A",),
    input_patches: Sequence[str] = INPUT_PATCHES,
) -> list[Variant]:
    """Output (`z`) patching for `output_sets` (default: every set) and each input patch kind
    for `input_sets` (the paper shows input patching for set A)."""
    output_sets = list(head_sets) if output_sets is None else list(output_sets)
    for name in [*output_sets, *input_sets]:
        if name not in head_sets:
            raise CircuitError(f"unknown head set {name!r}; known: {', '.join(head_sets)}")
    out = [Variant(name, "z", head_sets[name]) for name in output_sets]
    out += [Variant(name, p, head_sets[name]) for name in input_sets for p in input_patches]
    return out


def cmap_rows(result: CmapResult, source_name: str, base_name: str, reading: str = "paper") -> list[dict]:
    """CSV rows: one per variant, with both baselines on every row; an empty set says so."""
    return [
        {
            "source": source_name,
            "base": base_name,
            "positions": reading,
            "set": v.name,
            "patch": v.patch,
            "n_heads": v.n_heads,
            "accuracy": None if math.isnan(acc) else round(acc, 4),
            "base_accuracy": round(result.base, 4),
            "source_accuracy": round(result.source, 4),
            "n": result.n,
            "note": "no heads selected; not patched" if v.n_heads == 0 else "",
        }
        for v, acc in result.variants
    ]


# ---------------------------------------------------------------------------------------------
# Attention knockout

EDGES: tuple[Edge, ...] = (
    Edge("last->object", "last", "answer_object"),
    Edge("last->query_label", "last", "query_label"),
    Edge("query_label->prev_query_label", "query_label", "prev_query_label"),
    Edge("last->random", "last", "random_context"),
)
EDGE_TITLES = {
    "last->object": "last token → correct object",
    "last->query_label": "last token → query label",
    "query_label->prev_query_label": "query label → previous query label",
    "last->random": "last token → random context token (control)",
}


def edges_to(circuit: Circuit) -> list[Edge]:
    """Knockout edges from the last token to each single position a circuit's groups act at
    before it (a discovered circuit's positions: where the last token's heads read)."""
    specs = dict.fromkeys(p for g in circuit.groups for p in circuit.positions_of(g) if p != "last")
    return [Edge(f"last->{spec}", "last", spec) for spec in specs]


def with_random_context(prompts: PromptSet, seed: int) -> PromptSet:
    """The prompts with a `random_context` position: per prompt a seeded random context token
    (after BOS, up to the last object or label) that is neither the correct object nor the
    previous query label (the knockout's control edge)."""
    rng = random.Random(seed)
    ends = torch.maximum(prompts.positions["objects"].max(1).values, prompts.positions["labels"].max(1).values)
    avoid = zip(prompts.position("answer_object").tolist(), prompts.position("prev_query_label").tolist())
    out = []
    for end, (obj, prev) in zip(ends.tolist(), avoid):
        choices = [p for p in range(1, end + 1) if p not in (obj, prev)]
        if not choices:
            raise DataError("prompt too short for a random-position control")
        out.append(rng.choice(choices))
    return prompts.replace(positions={"random_context": torch.tensor(out)})


def knockout_rows(model_name: str, full: float, curves: Mapping[str, list[float]], n: int) -> list[dict]:
    """CSV rows: one per (edge, first blocked layer)."""
    return [
        {"model": model_name, "edge": edge, "from_layer": layer, "accuracy": round(acc, 4),
         "full_accuracy": round(full, 4), "n": n}
        for edge, accs in curves.items()
        for layer, acc in enumerate(accs)
    ]
