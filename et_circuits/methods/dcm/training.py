"""Training DCM masks: a mask in [0, 1] per head, initialised to 1, trained with Adam on
-(mean target logit) + lambda * sum(1 - m) with the model frozen and clamped after every step;
after each step the rounded mask (m < 0.5: patched) is scored on the eval pairs and the best
one is kept. Masks of one head set train together in one batch (`train_masks`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.errors import DataError
from et_circuits.core.metrics import Metric, accuracy, metric_value
from et_circuits.core.types import Head

from .masking import frozen, masked_logits, patched_logits
from .pairs import PairData

THRESHOLD = 0.5  # a head is selected (patched from the source) when its mask is below this


@dataclass(frozen=True)
class DCMConfig:
    """Mask-training hyper-parameters; the defaults are those of Prakash et al. (2024)."""

    lam: float = 0.01
    lr: float = 0.1
    epochs: int = 2
    batch_size: int = 32
    inference_batch_size: int = 128  # chunks of the gradient-free passes (results do not depend on it)
    # At most this many (mask, pair) rows in one training forward: masks of one head set train
    # together up to it (the memory knob; results do not depend on it).
    max_stacked_rows: int = 1024

    def __post_init__(self) -> None:
        if (
            min(self.lr, self.epochs, self.batch_size, self.inference_batch_size, self.max_stacked_rows) <= 0
            or self.lam < 0
        ):
            raise DataError(f"impossible DCM settings: {self}")


@dataclass
class MaskResult:
    """One mask training: the final mask and the best rounded mask on the eval pairs."""

    heads: list[Head]  # in mask order
    mask: list[float]  # final clamped mask
    selected: list[Head]  # heads of the best rounded mask (m < 0.5: patched)
    eval_score: float  # the metric on the eval pairs with that mask
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


def stacked(parts: Sequence[PairData]) -> tuple[PairData, Int[Tensor, " rows"]]:
    """The pairs of several jobs as one batch, and the job of every row."""
    job = torch.cat([torch.full((len(p),), j, dtype=torch.long) for j, p in enumerate(parts)])
    return PairData.concat(parts), job


def train_mask(
    model: HookedTransformer,
    heads: Sequence[Head],
    train: PairData,
    eval: PairData,
    *,
    config: DCMConfig = DCMConfig(),
    metric: Metric = accuracy,
    seed: int = 0,
    progress: bool = False,
) -> MaskResult:
    """Train one DCM mask over `heads` (see the module docstring); deterministic per seed."""
    return train_masks(model, heads, [MaskJob(train, eval, seed)], config=config, metric=metric, progress=progress)[0]


def train_masks(
    model: HookedTransformer,
    heads: Sequence[Head],
    jobs: Sequence[MaskJob],
    *,
    config: DCMConfig = DCMConfig(),
    metric: Metric = accuracy,
    progress: bool = False,
) -> list[MaskResult]:
    """Train one mask over `heads` per job, all in the same forward passes: each step stacks
    every job's batch, each row mixed by its own job's mask, and the loss is the sum of the
    jobs' losses, so each mask gets the gradient it would get alone (and Adam, elementwise,
    takes the same step). Each job's rounded masks are scored with `metric` (default accuracy)
    on its own eval pairs, the jobs' new ones in shared passes; the best-scoring one is kept.
    The jobs need the same number of train pairs."""
    heads = [tuple(map(int, h)) for h in heads]
    n_jobs, k = len(jobs), len(heads)
    if len({len(j.train) for j in jobs}) > 1:
        raise DataError("masks trained together need the same number of train pairs")
    scores: list[dict[tuple[bool, ...], float]] = [{} for _ in jobs]
    eval_prompts = [j.eval.prompts() for j in jobs]

    def score(selected: Bool[Tensor, "jobs k"]) -> list[float]:
        """Each job's eval score with its rounded mask (each distinct one computed once)."""
        todo = [j for j in range(n_jobs) if tuple(selected[j].tolist()) not in scores[j]]
        if todo:
            data, job = stacked([jobs[j].eval for j in todo])
            rows = selected[torch.tensor(todo)][job]
            logits = patched_logits(model, heads, rows, data, config.inference_batch_size)
            for i, j in enumerate(todo):
                scores[j][tuple(selected[j].tolist())] = metric_value(metric(logits[job == i], eval_prompts[j]))
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
                chunk, job = stacked([j.train.take(i) for j, i in zip(jobs, idx)])
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
            heads,
            mask[j].detach().tolist(),
            [h for h, s in zip(heads, best[j][2].tolist()) if s],
            best[j][0],
            best[j][1],
            len(losses[j]),
            losses[j],
        )
        for j in range(n_jobs)
    ]
