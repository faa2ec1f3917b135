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
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.distributed import sharded_map
from et_circuits.core.errors import DataError
from et_circuits.core.metrics import Metric, accuracy, metric_name, per_prompt
from et_circuits.core.prompts import Spec, spec_text
from et_circuits.core.serial import (
    frame,
    heads_from_json,
    heads_text,
    heads_to_json,
    number,
    spec_from_json,
    spec_to_json,
)
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Head

from .masking import masked_logits, patched_logits
from .pairs import MAX_RESTART_BYTES, PairData, Pairs, Question, prepare_pairs
from .scheduling import shared_runs, stacks_of
from .training import DCMConfig, MaskJob, stacked, train_masks


def bootstrap(values: Float[Tensor, " n"], n_resamples: int, seed: int = 0) -> list[float]:
    """The mean of per-pair `values` on `n_resamples` resamplings (with replacement, same size)
    of the test pairs."""
    if n_resamples <= 0:
        raise DataError(f"n_resamples must be positive, got {n_resamples}")
    if len(values) == 0:
        raise DataError("no test pairs to resample")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (n_resamples, len(values)), generator=g)
    return values.float()[idx].mean(1).tolist()


@dataclass(frozen=True, eq=False)
class SeedResult:
    """One seed's training: the heads it selected, its final mask, the metric on its eval and
    test pairs, each test pair's value, the step of its best mask (0: no head patched was
    never beaten) of `steps`, and its seconds."""

    heads: list[Head]
    mask: list[float]
    eval_score: float
    test_score: float
    test_values: Float[Tensor, " n_test"]
    best_step: int
    steps: int
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "heads": heads_to_json(self.heads),
            "mask": self.mask,
            "eval_score": self.eval_score,
            "test_score": self.test_score,
            "test_values": self.test_values.tolist(),
            "best_step": self.best_step,
            "steps": self.steps,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict) -> SeedResult:
        return cls(
            heads_from_json(d["heads"]),
            list(d["mask"]),
            d["eval_score"],
            d["test_score"],
            torch.tensor(d["test_values"], dtype=torch.float32),
            d["best_step"],
            d["steps"],
            d["seconds"],
        )


@dataclass(frozen=True, eq=False)
class DCMResult:
    """A question's answer: the heads the selected seed (best eval score; the first on ties)
    patches, the metric on each resampling of its test pairs (`resampled`), and every seed's
    result."""

    heads: tuple[Head, ...]
    position: Spec
    selected_seed: int
    seeds: dict[int, SeedResult]
    resampled: list[float]
    metric: str = "accuracy"

    @property
    def selected(self) -> list[Head]:
        return self.seeds[self.selected_seed].heads

    @property
    def mean(self) -> float:
        """Mean over the resamplings of the selected seed's test pairs."""
        return statistics.fmean(self.resampled)

    @property
    def std(self) -> float:
        return _std(self.resampled)

    @property
    def test_mean(self) -> float:
        """Mean over the seeds of each seed's test score."""
        return statistics.fmean(r.test_score for r in self.seeds.values())

    @property
    def test_std(self) -> float:
        return _std([r.test_score for r in self.seeds.values()])

    def to_frame(self):
        """One row per seed: seed, selected (the chosen seed), heads, eval and test scores."""
        rows = [
            {
                "seed": s,
                "selected": s == self.selected_seed,
                "heads": heads_text(r.heads, most=len(r.heads)),
                "eval_score": r.eval_score,
                "test_score": r.test_score,
                "best_step": r.best_step,
                "steps": r.steps,
            }
            for s, r in self.seeds.items()
        ]
        return frame(rows, ["seed", "selected", "heads", "eval_score", "test_score", "best_step", "steps"])

    def to_json(self) -> dict:
        return {
            "heads": heads_to_json(self.heads),
            "position": spec_to_json(self.position),
            "selected_seed": self.selected_seed,
            "seeds": {str(s): r.to_json() for s, r in self.seeds.items()},
            "resampled": self.resampled,
            "metric": self.metric,
        }

    @classmethod
    def from_json(cls, d: dict) -> DCMResult:
        return cls(
            tuple(heads_from_json(d["heads"])),
            spec_from_json(d["position"]),
            d["selected_seed"],
            {int(s): SeedResult.from_json(r) for s, r in d["seeds"].items()},
            list(d["resampled"]),
            d["metric"],
        )

    def __repr__(self) -> str:
        return (
            f"DCMResult({heads_text(self.selected)} of {len(self.heads)} heads at {spec_text(self.position)}; "
            f"{self.metric} {number(self.mean)} ± {number(self.std)} (seed {self.selected_seed} of "
            f"{len(self.seeds)}))"
        )


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def select_seed(seeds: Mapping[int, SeedResult]) -> int:
    """The seed with the best eval score; the lowest seed among equals."""
    return max(seeds, key=lambda s: (seeds[s].eval_score, -s))


def summarize(
    heads: Sequence[Head],
    position: Spec,
    seeds: Mapping[int, SeedResult],
    *,
    resamples: int,
    resample_seed: int,
    metric: str = "accuracy",
) -> DCMResult:
    """The protocol's result from every seed's training of one head set."""
    chosen = select_seed(seeds)
    resampled = bootstrap(seeds[chosen].test_values, resamples, resample_seed)
    return DCMResult(tuple(heads), position, chosen, dict(seeds), resampled, metric)


def dcm(
    model: HookedTransformer,
    heads: Sequence[Head],
    position: Spec,
    fit: Pairs,
    test: Pairs,
    *,
    n_train: int,
    n_eval: int,
    seeds: Sequence[int] = (0, 1, 2),
    config: DCMConfig = DCMConfig(),
    metric: Metric = accuracy,
    resamples: int = 10,
    resample_seed: int = 0,
    settings: RunSettings = QUIET,
) -> DCMResult:
    """DCM for one head set at one position or position set: per seed, a mask trained on
    `n_train` of the `fit` pairs and selected on the next `n_eval` (the seed permutes them), the
    seed with the best eval score chosen, and `metric` (default accuracy) on its `test` pairs
    resampled `resamples` times. Returns a `DCMResult` (see `dcm_many`, which answers many
    questions in shared passes)."""
    question = Question(tuple(map(tuple, heads)), position, fit, test)
    return dcm_many(
        model,
        [question],
        n_train=n_train,
        n_eval=n_eval,
        seeds=seeds,
        config=config,
        metric=metric,
        resamples=resamples,
        resample_seed=resample_seed,
        settings=settings,
    )[0]


SeedLookup = Callable[[int, int], "SeedResult | None"]  # (question index, seed) -> a finished result
SeedDone = Callable[[int, int, SeedResult], None]


def dcm_many(
    model: HookedTransformer,
    questions: Sequence[Question],
    *,
    n_train: int,
    n_eval: int,
    seeds: Sequence[int] = (0, 1, 2),
    config: DCMConfig = DCMConfig(),
    metric: Metric = accuracy,
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
    the stacks are shared out over the ranks (`distributed`). `finished(i, seed)` may return a
    seed's earlier result (it is then not retrained); `on_seed(i, seed, result)` is called after
    each training (to save progress)."""
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
    runs = shared_runs(model, [questions[i] for i in dict.fromkeys(i for i, _ in todo)], batch, max_restart_bytes)
    prepared: dict[int, tuple[PairData, PairData]] = {}

    def pairs_of(i: int) -> tuple[PairData, PairData]:
        if i not in prepared:  # once per question (its source values and restart point)
            q = questions[i]
            prepared[i] = tuple(
                prepare_pairs(
                    model,
                    pairs,
                    q.position,
                    q.heads,
                    batch_size=batch,
                    run=runs.get((id(pairs.base.input_ids), q.heads, q.position), False),
                )
                for pairs in (q.fit, q.test)
            )
        return prepared[i]

    plain: dict[int, Tensor] = {}

    @torch.no_grad()  # with grad, each cached row kept its chunk's whole autograd graph alive
    def unpatched(data: PairData) -> Float[Tensor, "n vocab"]:
        """The unpatched model's logits on the base prompts (once per prompt set: every
        question without heads asks the same)."""
        if id(data.input_ids) not in plain:
            plain[id(data.input_ids)] = torch.cat(
                [masked_logits(model, [], torch.zeros(0), c).float().cpu() for c in data.chunks(batch)]
            )
        return plain[id(data.input_ids)]

    def train_stack(stack: list[tuple[int, int]]) -> list[SeedResult]:
        start = time.perf_counter()
        heads = questions[stack[0][0]].heads
        orders = [
            torch.randperm(len(pairs_of(i)[0]), generator=torch.Generator().manual_seed(seed)) for i, seed in stack
        ]
        if not heads:  # nothing to mask: every seed's score is the unpatched model's
            out = []
            for (i, _), order in zip(stack, orders):
                fit, test = pairs_of(i)
                held = order[n_train : n_train + n_eval]
                values = per_prompt(metric, unpatched(test), test.prompts())
                eval_score = per_prompt(metric, unpatched(fit)[held], fit.take(held).prompts()).mean().item()
                out.append(SeedResult([], [], eval_score, values.mean().item(), values, 0, 0))
            return out
        jobs = [
            MaskJob(pairs_of(i)[0].take(order[:n_train]), pairs_of(i)[0].take(order[n_train : n_train + n_eval]), seed)
            for (i, seed), order in zip(stack, orders)
        ]
        masks = train_masks(model, heads, jobs, config=config, metric=metric)
        test, job = stacked([pairs_of(i)[1] for i, _ in stack])
        logits = patched_logits(model, heads, torch.stack([m.selected_mask() for m in masks])[job], test, batch)
        values = per_prompt(metric, logits, test.prompts())
        seconds = round((time.perf_counter() - start) / len(stack), 2)
        return [
            SeedResult(
                m.selected,
                [round(x, 4) for x in m.mask],
                m.eval_score,
                values[job == n].mean().item(),
                values[job == n],
                m.best_step,
                m.steps,
                seconds,
            )
            for n, m in enumerate(masks)
        ]

    stacks = stacks_of(questions, todo, max(1, config.max_stacked_rows // config.batch_size))
    bar = tqdm(total=len(todo), desc="dcm masks", disable=not settings.progress)

    def done(s: int, found: list[SeedResult]) -> None:
        for (i, seed), result in zip(stacks[s], found):
            results[i][seed] = result
            if on_seed is not None:
                on_seed(i, seed, result)
        bar.update(len(found))

    # each stack on one rank (all of them in one process), balanced by its trainings (none without heads)
    costs = [len(stack) if questions[stack[0][0]].heads else 0.01 for stack in stacks]
    sharded_map(train_stack, stacks, done, costs=costs)
    bar.close()
    return [
        summarize(q.heads, q.position, r, resamples=resamples, resample_seed=resample_seed, metric=metric_name(metric))
        for q, r in zip(questions, results)
    ]
