"""Desiderata-based Component Masking (DCM): which of a set of heads carry the information that
a set of counterfactual pairs tests.

`Pairs` hold base prompts and source prompts, one source per base; each base prompt's answer is
the pair's *target*: what the model should answer on the base when the patched heads carry the
source's information. For heads acting at a named position, or a position set (e.g.
("prev_query_label+1", "prev_query_label+2")), a mask m in [0, 1] per head, initialised to 1,
mixes each head's output (`hook_z`) at every one of those positions as
m * z_base + (1 - m) * z_source, where z_source is read from the source prompt at the source's
own positions and written into the base at the base's (slot by slot). The loss is
-(mean logit of the target at the last position) + lambda * sum(1 - m); Adam updates only the
mask (the model is frozen) and the mask is clamped to [0, 1] after every step. After each step
the rounded mask (heads with m < 0.5 are patched) is scored on the eval pairs (each distinct
rounded mask once) and the best one is kept: its heads are the ones that carry the information.

`dcm` runs the paper's protocol on top: several seeds, each splitting the fit pairs anew into
train / eval and ordering the batches, the seed with the best eval accuracy selected, its test
accuracy resampled. `dcm_many` does that for many questions, sharing the base prompts' clean
runs between those asked on the same prompts.

Speed: a patch at layer >= L and position >= p cannot change anything below layer L or before
position p, so every training or evaluation step restarts there from the base prompts' clean
run (`resume`); one token for groups at the last position. Without the memory for it
(`max_restart_bytes`), the full forward is used.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .distributed import sharded_map
from .errors import DataError
from .hooks import Hook, logits_at, patch_hooks, store_hooks
from .prompts import LAST, PromptSet, Spec
from .resume import CleanRun, earliest, restart_bytes, restarts, resume
from .settings import QUIET, RunSettings
from .types import Head

THRESHOLD = 0.5  # a head is selected (patched from the source) when its mask is below this
MAX_RESTART_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class DCMConfig:
    """Mask-training hyper-parameters; the defaults are the paper's."""

    lam: float = 0.01
    lr: float = 0.1
    epochs: int = 2
    batch_size: int = 32
    inference_batch_size: int = 128  # chunks of the gradient-free passes (results do not depend on it)
    # At most this many (mask, pair) rows in one training forward: masks of one head set train
    # together up to it (the memory knob; results do not depend on it).
    max_stacked_rows: int = 1024

    def __post_init__(self) -> None:
        if min(self.lr, self.epochs, self.batch_size, self.inference_batch_size, self.max_stacked_rows) <= 0 or self.lam < 0:
            raise DataError(f"impossible DCM settings: {self}")


@dataclass(frozen=True)
class Pairs:
    """Counterfactual pairs: `base` prompts, whose answers are the targets, and one `source`
    prompt per base. Both carry the positions the masked heads act at."""

    base: PromptSet
    source: PromptSet

    def __post_init__(self) -> None:
        if len(self.base) != len(self.source):
            raise DataError(f"{len(self.base)} base prompts but {len(self.source)} source prompts")

    def __len__(self) -> int:
        return len(self.base)

    @property
    def target(self) -> Int[Tensor, " n"]:
        return self.base.answers

    def __getitem__(self, index) -> "Pairs":
        return Pairs(self.base[index], self.source[index])


# ---------------------------------------------------------------------------------------------
# Source values and the prepared form of pairs


@torch.no_grad()
def source_values(
    model: HookedTransformer,
    source: PromptSet,
    heads_at: Mapping[Spec, Sequence[Head]],
    batch_size: int = 32,
) -> dict[Spec, dict[Head, Float[Tensor, "n slots d_head"]]]:
    """`hook_z` of the heads in `heads_at[position]` at each source prompt's own `position`
    (one slot per position of a set), for every position in one forward pass per chunk (on CPU)."""
    out: dict[Spec, dict[Head, list[Tensor]]] = {p: defaultdict(list) for p in heads_at}
    wanted = {p: sorted({layer for layer, _ in hs}) for p, hs in heads_at.items() if hs}
    if not wanted:
        return {p: {} for p in heads_at}
    stop = max(max(layers) for layers in wanted.values()) + 1
    for chunk in source.chunks(batch_size):
        stores: dict[Spec, dict[int, Tensor]] = {p: {} for p in wanted}
        hooks = [h for p, layers in wanted.items() for h in store_hooks("z", chunk.position_set(p), layers, stores[p])]
        model.run_with_hooks(chunk.input_ids.to(model.cfg.device), fwd_hooks=hooks, stop_at_layer=stop)
        for p in wanted:
            for layer, head in heads_at[p]:
                out[p][(layer, head)].append(stores[p][layer][:, :, head].float().cpu())
    return {p: {h: torch.cat(v) for h, v in out[p].items()} for p in heads_at}


@dataclass
class PairData:
    """Pairs prepared for one head set at one position (set): base prompts, the positions in
    each base (-1: a slot a prompt lacks), the last position, the target id, the source values
    of the heads (in head order, per slot) and, optionally, the base prompts' clean run
    restricted to where the patch can act (`restart` = (layer, start))."""

    input_ids: Int[Tensor, "n seq"]
    position: Int[Tensor, "n slots"]
    last: Int[Tensor, " n"]
    target: Int[Tensor, " n"]
    values: Float[Tensor, "n slots k d_head"]
    run: CleanRun | None = None
    restart: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, idx: Int[Tensor, " m"]) -> "PairData":
        run = self.run.take(idx) if self.run is not None else None
        return PairData(
            self.input_ids[idx], self.position[idx], self.last[idx], self.target[idx], self.values[idx], run, self.restart
        )

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield self.take(torch.arange(start, min(start + size, len(self))))

    @staticmethod
    def concat(parts: Sequence["PairData"]) -> "PairData":
        """Pairs of the same base prompts' layout (and restart point) as one batch."""
        if len({p.restart for p in parts}) > 1 or len({p.run is None for p in parts}) > 1:
            raise DataError("pairs joined into one batch need the same restart point")
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        run = None if parts[0].run is None else CleanRun.concat([p.run for p in parts])
        return PairData(cat("input_ids"), cat("position"), cat("last"), cat("target"), cat("values"), run, parts[0].restart)


def restart_point(heads: Sequence[Head], positions: Int[Tensor, "n slots"]) -> tuple[int, int]:
    """(first layer, first position) a patch of `heads` at `positions` can change."""
    return min(layer for layer, _ in heads), int(earliest(positions).min())


def prepare(
    model: HookedTransformer,
    pairs: Pairs,
    position: Spec,
    heads: Sequence[Head],
    values: Mapping[Head, Tensor] | None = None,
    run: CleanRun | bool = True,
    batch_size: int = 32,
    max_restart_bytes: int = MAX_RESTART_BYTES,
) -> PairData:
    """PairData of `heads` at `position`. Reads the source values unless given; with
    `run=True` also makes the base prompts' restricted clean run (if it fits in memory), or
    uses the given one (`run=False`: full forwards)."""
    heads = [tuple(map(int, h)) for h in heads]
    if values is None:
        values = source_values(model, pairs.source, {position: heads}, batch_size)[position]
    base = pairs.base
    at = base.position_set(position)
    if heads and pairs.source.position_set(position).shape[1] != at.shape[1]:
        raise DataError(f"source and base prompts have different numbers of {position!r} positions")
    n, d = len(pairs), model.cfg.d_head
    stacked = torch.stack([values[h] for h in heads], dim=2) if heads else torch.zeros(n, at.shape[1], 0, d)
    data = PairData(base.input_ids, at, base.position(LAST), pairs.target, stacked)
    if heads and run is not False:
        data.restart = restart_point(heads, data.position)
        if isinstance(run, CleanRun):
            data.run = run
        elif restart_bytes(model, n, base.seq_len, *data.restart) <= max_restart_bytes:
            data.run = restarts(model, base.input_ids, [data.restart], batch_size)[0]
        else:
            data.restart = None
    return data


# ---------------------------------------------------------------------------------------------
# The masked forward pass


def mask_hooks(
    heads: Sequence[Head],
    mask: Float[Tensor, " k"] | Float[Tensor, "batch k"],
    values: Float[Tensor, "batch slots k d_head"],
    positions: Int[Tensor, "batch slots"],
    n_layers: int,
    n_heads: int,
) -> list[Hook]:
    """Hooks setting each head's z at every slot of `positions` to m * z + (1 - m) * value:
    `hooks.patch_hooks` with weight 1 - m (differentiable in m). A mask per example (one row
    of `mask` each) lets several masks train in one batch."""
    device = values.device
    layer_idx = torch.tensor([layer for layer, _ in heads], dtype=torch.long, device=device)
    head_idx = torch.tensor([head for _, head in heads], dtype=torch.long, device=device)
    mask = mask.to(device)
    if mask.ndim == 1:
        weights = torch.zeros(n_layers, n_heads, device=device, dtype=mask.dtype)
        weights = weights.index_put((layer_idx, head_idx), 1 - mask)
    else:  # [layer, batch, head]
        row_idx = torch.arange(mask.shape[0], device=device)[:, None]
        weights = torch.zeros(mask.shape[0], n_layers, n_heads, device=device, dtype=mask.dtype)
        weights = weights.index_put((row_idx, layer_idx[None], head_idx[None]), 1 - mask).transpose(0, 1)
    new: dict[int, Tensor] = {}
    for layer in sorted({layer for layer, _ in heads}):
        cols = [i for i, (l, _) in enumerate(heads) if l == layer]
        full = values.new_zeros(values.shape[0], values.shape[1], n_heads, values.shape[3])
        full[:, :, [heads[i][1] for i in cols]] = values[:, :, cols]
        new[layer] = full
    return patch_hooks("z", new, positions, weights)


def masked_logits(
    model: HookedTransformer,
    heads: Sequence[Head],
    mask: Float[Tensor, " k"] | Float[Tensor, "batch k"],
    data: PairData,
) -> Float[Tensor, "batch vocab"]:
    """Last-position logits of the base prompts with the heads mixed by `mask` (one for all
    pairs, or one per pair); restarts from `data.run` when present (same result, far fewer
    tokens and layers)."""
    device = model.cfg.device
    offset = data.restart[1] if data.run is not None else 0
    hooks = []
    if heads:
        hooks = mask_hooks(
            heads, mask, data.values.to(device, model.cfg.dtype),
            torch.where(data.position >= 0, data.position - offset, -1).to(device),
            model.cfg.n_layers, model.cfg.n_heads,
        )
    if data.run is None:
        return logits_at(model.run_with_hooks(data.input_ids.to(device), fwd_hooks=hooks), data.last.to(device))
    return resume(model, data.run, data.restart[0], offset, hooks, grad=True, read_at=data.last - offset)


@torch.no_grad()
def patched_correct(
    model: HookedTransformer,
    heads: Sequence[Head],
    selected: Bool[Tensor, " k"] | Bool[Tensor, "n k"],
    data: PairData,
    batch_size: int = 32,
) -> Bool[Tensor, " n"]:
    """Per pair: is the argmax the target when the selected heads (one selection for all pairs,
    or one per pair) are patched from the source into the base (the other heads untouched)?"""
    mask = (~selected).float()
    out = []
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        chunk = data.take(rows)
        logits = masked_logits(model, heads, mask if mask.ndim == 1 else mask[rows], chunk)
        out.append(logits.argmax(-1).cpu() == chunk.target)
    return torch.cat(out)


@contextmanager
def frozen(model: HookedTransformer):
    """Inside the block no model weight takes a gradient (restored after): only the mask trains."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# Training masks


@dataclass
class MaskResult:
    """One mask training: the final mask and the best rounded mask on the eval pairs."""

    heads: list[Head]  # in mask order
    mask: list[float]  # final clamped mask
    selected: list[Head]  # heads of the best rounded mask (m < 0.5: patched)
    eval_accuracy: float
    best_step: int  # 0: the initial mask (no head patched) was never beaten
    steps: int
    losses: list[float] = field(default_factory=list)

    def selected_mask(self) -> Bool[Tensor, " k"]:
        chosen = set(self.selected)
        return torch.tensor([h in chosen for h in self.heads], dtype=torch.bool)


@dataclass(frozen=True)
class MaskJob:
    """One mask to train: its train and eval pairs and the seed that orders its batches."""

    train: PairData
    eval: PairData
    seed: int


def _stacked(parts: Sequence[PairData]) -> tuple[PairData, Int[Tensor, " rows"]]:
    """The pairs of several jobs as one batch, and the job of every row."""
    job = torch.cat([torch.full((len(p),), j, dtype=torch.long) for j, p in enumerate(parts)])
    return PairData.concat(parts), job


def train_mask(
    model: HookedTransformer,
    heads: Sequence[Head],
    train: PairData,
    eval: PairData,
    config: DCMConfig = DCMConfig(),
    seed: int = 0,
    progress: bool = False,
) -> MaskResult:
    """Train one DCM mask over `heads` (see the module docstring); deterministic per seed."""
    return train_masks(model, heads, [MaskJob(train, eval, seed)], config, progress)[0]


def train_masks(
    model: HookedTransformer,
    heads: Sequence[Head],
    jobs: Sequence[MaskJob],
    config: DCMConfig = DCMConfig(),
    progress: bool = False,
) -> list[MaskResult]:
    """Train one mask over `heads` per job, all in the same forward passes: each step stacks
    every job's batch, each row mixed by its own job's mask, and the loss is the sum of the
    jobs' losses, so each mask gets the gradient it would get alone (and Adam, elementwise,
    takes the same step). Each job's rounded masks are scored on its own eval pairs, the jobs'
    new ones in shared passes. The jobs need the same number of train pairs."""
    heads = [tuple(map(int, h)) for h in heads]
    n_jobs, k = len(jobs), len(heads)
    if len({len(j.train) for j in jobs}) > 1:
        raise DataError("masks trained together need the same number of train pairs")
    scores: list[dict[tuple[bool, ...], float]] = [{} for _ in jobs]

    def score(selected: Bool[Tensor, "jobs k"]) -> list[float]:
        """Each job's eval accuracy with its rounded mask (each distinct one computed once)."""
        todo = [j for j in range(n_jobs) if tuple(selected[j].tolist()) not in scores[j]]
        if todo:
            data, job = _stacked([jobs[j].eval for j in todo])
            rows = selected[torch.tensor(todo)][job]
            correct = patched_correct(model, heads, rows, data, config.inference_batch_size).float()
            for i, j in enumerate(todo):
                scores[j][tuple(selected[j].tolist())] = correct[job == i].mean().item()
        return [scores[j][tuple(selected[j].tolist())] for j in range(n_jobs)]

    none = torch.zeros(n_jobs, k, dtype=torch.bool)
    best = [(acc, 0, none[j]) for j, acc in enumerate(score(none))]
    if not heads:
        return [MaskResult([], [], [], b[0], 0, 0) for b in best]
    mask = torch.ones(n_jobs, k, requires_grad=True)
    opt = torch.optim.Adam([mask], lr=config.lr)
    generators = [torch.Generator().manual_seed(j.seed) for j in jobs]
    n_train = len(jobs[0].train)
    steps = config.epochs * math.ceil(n_train / config.batch_size)
    losses: list[list[float]] = [[] for _ in jobs]
    with frozen(model), tqdm(total=steps, desc="mask", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            orders = [torch.randperm(n_train, generator=g).split(config.batch_size) for g in generators]
            for idx in zip(*orders):
                chunk, job = _stacked([j.train.take(i) for j, i in zip(jobs, idx)])
                logits = masked_logits(model, heads, mask[job], chunk)
                target = logits.gather(1, chunk.target.to(logits.device)[:, None])[:, 0].float().cpu()
                mean_target = torch.zeros(n_jobs).index_add(0, job, target) / torch.bincount(job, minlength=n_jobs)
                loss = -mean_target + config.lam * (1 - mask).sum(1)
                opt.zero_grad()
                loss.sum().backward()
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0, 1)
                selected = mask.detach() < THRESHOLD
                for j, (acc, value) in enumerate(zip(score(selected), loss.tolist())):
                    losses[j].append(value)
                    if acc > best[j][0]:
                        best[j] = (acc, len(losses[j]), selected[j])
                bar.update()
    return [
        MaskResult(
            heads, mask[j].detach().tolist(), [h for h, s in zip(heads, best[j][2].tolist()) if s],
            best[j][0], best[j][1], len(losses[j]), losses[j],
        )
        for j in range(n_jobs)
    ]


def bootstrap(correct: Bool[Tensor, " n"], n_resamples: int, seed: int = 0) -> list[float]:
    """Accuracy on `n_resamples` resamplings (with replacement, same size) of the test pairs."""
    if n_resamples <= 0:
        raise DataError(f"n_resamples must be positive, got {n_resamples}")
    if len(correct) == 0:
        raise DataError("no test pairs to resample")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(correct), (n_resamples, len(correct)), generator=g)
    return correct.float()[idx].mean(1).tolist()


# ---------------------------------------------------------------------------------------------
# The paper's protocol: seeds, best seed by eval accuracy, resampled test accuracy


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
                prepare(model, pairs, q.position, q.heads, batch_size=batch,
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
        test, job = _stacked([pairs_of(i)[1] for i, _ in stack])
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
