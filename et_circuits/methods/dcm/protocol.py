"""Desiderata-based Component Masking (DCM): which of a set of heads carry the information that
a set of counterfactual pairs tests.

`Pairs` hold base prompts and source prompts, one source per base; each base prompt's answer is
the pair's *target*: what the model should answer on the base when the patched heads carry the
source's information. For heads acting at a named position, or a position set, a mask m in
[0, 1] per head, initialised to 1, mixes each head's output (`hook_z`) at every one of those
positions as m * z_base + (1 - m) * z_source, where z_source is read from the source prompt at
the source's own positions and written into the base at the base's (slot by slot). The loss is
-(mean logit of the target at the last position) + lambda * sum(1 - m); Adam updates only the
mask (the model is frozen) and the mask is clamped to [0, 1] after every step. After each step
the rounded mask (heads with m < 0.5 are patched) is scored on the eval pairs (each distinct
rounded mask once) and the best one is kept: its heads are the ones that carry the information.

`dcm` runs the protocol of Prakash et al. (2024) on top: several seeds, each splitting the fit
pairs anew into train / eval and ordering the batches, the seed with the best eval accuracy
selected, its test accuracy resampled. `dcm_many` does that for many questions, sharing the
base prompts' clean runs between those asked on the same prompts.

Speed: a patch at layer >= L and position >= p cannot change anything below layer L or before
position p, so every training or evaluation step restarts there from the base prompts' clean
run (`restart.run_suffix`); one token for groups at the last position. Without the memory for
it (`max_restart_bytes`), the full forward is used.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.distributed import sharded_map
from et_circuits.core.errors import DataError
from et_circuits.core.prompts import PromptSet, Spec
from et_circuits.core.restart import CleanRun, restart_bytes, restarts
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Head

from .masking import masked_logits, patched_correct
from .pairs import MAX_RESTART_BYTES, PairData, Pairs, prepare_pairs, restart_point
from .training import DCMConfig, MaskJob, stacked, train_masks


def bootstrap(correct: Bool[Tensor, " n"], n_resamples: int, seed: int = 0) -> list[float]:
    """Accuracy on `n_resamples` resamplings (with replacement, same size) of the test pairs."""
    if n_resamples <= 0:
        raise DataError(f"n_resamples must be positive, got {n_resamples}")
    if len(correct) == 0:
        raise DataError("no test pairs to resample")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(correct), (n_resamples, len(correct)), generator=g)
    return correct.float()[idx].mean(1).tolist()


@dataclass(frozen=True)
class Question:
    """One DCM question: which of `heads` at `position` carry what the pairs test. `fit` pairs
    are split by each seed into train and eval; `test` pairs give the reported accuracy."""

    heads: tuple[Head, ...]
    position: Spec
    fit: Pairs
    test: Pairs


@dataclass
class SeedResult:
    """One seed's training: the heads it selected, its final mask, its accuracies, and which
    test pairs it got right."""

    heads: list[Head]
    mask: list[float]
    eval_accuracy: float
    test_accuracy: float
    test_correct: Bool[Tensor, " n_test"]
    best_step: int
    steps: int
    seconds: float = 0.0


@dataclass
class DCMResult:
    """A question's answer: the heads the selected seed (best eval accuracy; the first on ties)
    patches, the accuracy on each resampling of its test pairs, and every seed's result."""

    heads: tuple[Head, ...]
    position: Spec
    selected_seed: int
    seeds: dict[int, SeedResult]
    accuracy: list[float]

    @property
    def selected(self) -> list[Head]:
        return self.seeds[self.selected_seed].heads

    @property
    def accuracy_mean(self) -> float:
        return statistics.fmean(self.accuracy)

    @property
    def accuracy_std(self) -> float:
        return _std(self.accuracy)

    @property
    def test_accuracy_mean(self) -> float:
        return statistics.fmean(r.test_accuracy for r in self.seeds.values())

    @property
    def test_accuracy_std(self) -> float:
        return _std([r.test_accuracy for r in self.seeds.values()])


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def select_seed(seeds: Mapping[int, SeedResult]) -> int:
    """The seed with the best eval accuracy; the lowest seed among equals."""
    return max(seeds, key=lambda s: (seeds[s].eval_accuracy, -s))


def summarize(
    heads: Sequence[Head], position: Spec, seeds: Mapping[int, SeedResult], resamples: int, resample_seed: int
) -> DCMResult:
    """The protocol's result from every seed's training of one head set."""
    chosen = select_seed(seeds)
    accuracy = bootstrap(seeds[chosen].test_correct, resamples, resample_seed)
    return DCMResult(tuple(heads), position, chosen, dict(seeds), accuracy)


def dcm(
    model: HookedTransformer,
    heads: Sequence[Head],
    position: Spec,
    fit: Pairs,
    test: Pairs,
    n_train: int,
    n_eval: int,
    seeds: Sequence[int] = (0, 1, 2),
    config: DCMConfig = DCMConfig(),
    resamples: int = 10,
    resample_seed: int = 0,
    settings: RunSettings = QUIET,
) -> DCMResult:
    """DCM with the paper's protocol for one head set at one position or position set (see
    `dcm_many`)."""
    question = Question(tuple(map(tuple, heads)), position, fit, test)
    return dcm_many(model, [question], n_train, n_eval, seeds, config, resamples, resample_seed, settings)[0]


SeedLookup = Callable[[int, int], "SeedResult | None"]  # (question index, seed) -> a finished result
SeedDone = Callable[[int, int, SeedResult], None]


def dcm_many(
    model: HookedTransformer,
    questions: Sequence[Question],
    n_train: int,
    n_eval: int,
    seeds: Sequence[int] = (0, 1, 2),
    config: DCMConfig = DCMConfig(),
    resamples: int = 10,
    resample_seed: int = 0,
    settings: RunSettings = QUIET,
    finished: SeedLookup | None = None,
    on_seed: SeedDone | None = None,
    max_restart_bytes: int = MAX_RESTART_BYTES,
) -> list[DCMResult]:
    """`dcm` for every question. Each seed permutes the fit pairs (a generator seeded by the
    seed) and takes the first `n_train` as train and the next `n_eval` as eval pairs.

    Questions asked on the same base prompts (the same `base.input_ids` tensor, as
    `PromptSet.replace` keeps it) share one clean run of them; source values are read once per
    question. The masks of one head set on the same prompts (every seed, every desideratum)
    train together (`train_masks`), `config.max_stacked_rows` rows at a time; under torchrun
    the stacks are shared out over the ranks (`distributed`). `finished(i,
    seed)` may return a seed's earlier result (it is then not retrained); `on_seed(i, seed,
    result)` is called after each training (to save progress)."""
    if not seeds:
        raise DataError("DCM needs at least one seed")
    batch = config.inference_batch_size
    results: list[dict[int, SeedResult]] = [{} for _ in questions]
    todo = []
    for i, q in enumerate(questions):
        for seed in seeds:
            done = finished(i, seed) if finished is not None else None
            if done is not None:
                results[i][seed] = done
            elif n_train + n_eval > len(q.fit):
                raise DataError(f"{n_train} train + {n_eval} eval pairs asked, but only {len(q.fit)} fit pairs given")
            else:
                todo.append((i, seed))
    runs = _shared_runs(model, [questions[i] for i in dict.fromkeys(i for i, _ in todo)], batch, max_restart_bytes)
    prepared: dict[int, tuple[PairData, PairData]] = {}

    def pairs_of(i: int) -> tuple[PairData, PairData]:
        if i not in prepared:  # once per question (its source values and restart point)
            q = questions[i]
            prepared[i] = tuple(
                prepare_pairs(model, pairs, q.position, q.heads, batch_size=batch,
                        run=runs.get((id(pairs.base.input_ids), q.heads, q.position), False))
                for pairs in (q.fit, q.test)
            )
        return prepared[i]

    plain: dict[int, Tensor] = {}

    def unpatched(data: PairData) -> Int[Tensor, " n"]:
        """The unpatched model's argmax on the base prompts (once per prompt set: every
        question without heads asks the same)."""
        if id(data.input_ids) not in plain:
            plain[id(data.input_ids)] = torch.cat(
                [masked_logits(model, [], torch.zeros(0), c).argmax(-1).cpu() for c in data.chunks(batch)]
            )
        return plain[id(data.input_ids)]

    def train_stack(stack: list[tuple[int, int]]) -> list[SeedResult]:
        start = time.perf_counter()
        heads = questions[stack[0][0]].heads
        orders = [torch.randperm(len(pairs_of(i)[0]), generator=torch.Generator().manual_seed(seed)) for i, seed in stack]
        if not heads:  # nothing to mask: every seed's accuracy is the unpatched model's
            out = []
            for (i, _), order in zip(stack, orders):
                fit, test = pairs_of(i)
                held = order[n_train : n_train + n_eval]
                correct = unpatched(test) == test.target
                eval_accuracy = (unpatched(fit)[held] == fit.target[held]).float().mean().item()
                out.append(SeedResult([], [], eval_accuracy, correct.float().mean().item(), correct, 0, 0))
            return out
        jobs = [
            MaskJob(pairs_of(i)[0].take(order[:n_train]), pairs_of(i)[0].take(order[n_train : n_train + n_eval]), seed)
            for (i, seed), order in zip(stack, orders)
        ]
        masks = train_masks(model, heads, jobs, config)
        test, job = stacked([pairs_of(i)[1] for i, _ in stack])
        correct = patched_correct(model, heads, torch.stack([m.selected_mask() for m in masks])[job], test, batch)
        seconds = round((time.perf_counter() - start) / len(stack), 2)
        return [
            SeedResult(
                m.selected, [round(x, 4) for x in m.mask], m.eval_accuracy, correct[job == n].float().mean().item(),
                correct[job == n], m.best_step, m.steps, seconds,
            )
            for n, m in enumerate(masks)
        ]

    stacks = _stacks(questions, todo, max(1, config.max_stacked_rows // config.batch_size))
    bar = tqdm(total=len(todo), desc="dcm masks", disable=not settings.progress)

    def done(s: int, found: list[SeedResult]) -> None:
        for (i, seed), result in zip(stacks[s], found):
            results[i][seed] = result
            if on_seed is not None:
                on_seed(i, seed, result)
        bar.update(len(found))

    sharded_map(train_stack, stacks, done)  # each stack on one rank (all of them in one process)
    bar.close()
    return [summarize(q.heads, q.position, r, resamples, resample_seed) for q, r in zip(questions, results)]


def _stacks(questions: Sequence[Question], todo: Sequence[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """The (question, seed) jobs in stacks of at most `size` that train together: jobs whose
    questions share heads, positions and base prompts (the seeds of a question, and the
    questions of one group asked on the same prompts), in order of first appearance."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, seed in todo:
        q = questions[i]
        key = (q.heads, q.position, id(q.fit.base.input_ids), id(q.test.base.input_ids))
        groups.setdefault(key, []).append((i, seed))
    return [jobs[s : s + size] for jobs in groups.values() for s in range(0, len(jobs), size)]


def _shared_runs(
    model: HookedTransformer, questions: Sequence[Question], batch_size: int, max_restart_bytes: int
) -> dict[tuple[int, tuple, Spec], CleanRun]:
    """Restricted clean runs of every question's fit and test base prompts, keyed by (id of the
    base token tensor, heads, position): one pass per distinct base tensor for all restart points
    (points that would not fit in `max_restart_bytes` together get none: full forwards)."""
    by_base: dict[int, tuple[PromptSet, dict[tuple[int, int], list]]] = {}
    for q in questions:
        if not q.heads:
            continue
        for pairs in (q.fit, q.test):
            base = pairs.base
            points = by_base.setdefault(id(base.input_ids), (base, {}))[1]
            points.setdefault(restart_point(q.heads, base.position_set(q.position)), []).append((q.heads, q.position))
    out: dict[tuple[int, tuple, Spec], CleanRun] = {}
    for key, (base, points) in by_base.items():
        n, seq = base.input_ids.shape
        budget, chosen = max_restart_bytes, []
        for point in points:
            size = restart_bytes(model, n, seq, *point)
            if size <= budget:
                chosen.append(point)
                budget -= size
        for point, run in zip(chosen, restarts(model, base.input_ids, chosen, batch_size)):
            for heads, position in points[point]:
                out[(key, heads, position)] = run
    return out
