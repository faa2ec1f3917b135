"""Desiderata-based Component Masking (DCM): which heads of a circuit group carry the
information a desideratum names.

For one group (heads acting at one position) and one desideratum's counterfactual pairs, a mask
m in [0, 1] per group head, initialised to 1, mixes each head's output (`hook_z`) at the group's
position as m * z_base + (1 - m) * z_source, where z_source is read from the source prompt at
the source's own group position and written into the base at the base's group position. The
loss is -(mean logit of the desideratum's target at the last token) + lambda * sum(1 - m); Adam
updates only the mask (the model is frozen) and the mask is clamped to [0, 1] after every step.
After each step the rounded mask (heads with m < 0.5 are patched) is scored on the eval pairs
(each distinct rounded mask once) and the best one is kept: its heads are the group's heads for
that desideratum, and its accuracy on the test pairs is reported.

Patching goes through `hooks.store_hooks` (source values) and `hooks.patch_hooks` with a float
weight 1 - m (the same code path patching and CMAP use).

Speed: a patch at layer >= L and position >= p cannot change anything below layer L or before
position p. So the base prompts are run once (`metrics.clean_run`), the residual stream entering
L and the keys / values of earlier positions in layers >= L are kept (`Resume`), and every
training or evaluation step runs only layers >= L on positions >= p (`metrics.resume`; one
token for groups at the last token). The result equals the full forward up to float rounding
(tested); without the memory for it (`max_resume_bytes`), the full forward is used.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .data import Batch, Counterfactual, DataError, Vocabulary, make_batch, object_token_ids
from .desiderata import SPLIT_SIZES, builder, draw_splits
from .hooks import Hook, logits_at, patch_hooks, store_hooks
from .metrics import CleanRun, clean_run, resume_with_grad

Head = tuple[int, int]
THRESHOLD = 0.5  # a head is selected (patched from the source) when its mask is below this
MAX_RESUME_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class DCMConfig:
    """Mask-training hyper-parameters; the defaults are the paper's."""

    lam: float = 0.01
    lr: float = 0.1
    epochs: int = 2
    batch_size: int = 32
    inference_batch_size: int = 128  # chunks of the gradient-free passes (results do not depend on it)

    def __post_init__(self) -> None:
        if min(self.lr, self.epochs, self.batch_size, self.inference_batch_size) <= 0 or self.lam < 0:
            raise DataError(f"impossible DCM settings: {self}")


# ---------------------------------------------------------------------------------------------
# Tokenized pairs, source values and the resume state of the base prompts


@dataclass
class Pairs:
    """Tokenized counterfactual pairs: base and source batches (every position taken from its
    own prompt) and the desideratum's target token per pair."""

    base: Batch
    source: Batch
    target: Int[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.base)

    @classmethod
    def build(cls, tokenizer, pairs: Sequence[Counterfactual], base: Batch | None = None) -> "Pairs":
        """Tokenize `pairs`; `base` reuses a batch of the very same base prompts (desiderata
        drawn by `draw_splits` with one seed share their bases)."""
        if base is None:
            base = make_batch(tokenizer, [p.base for p in pairs])
        elif base.samples != [p.base for p in pairs]:
            raise DataError("the given base batch holds other prompts than these pairs' bases")
        words = sorted({p.target for p in pairs})
        ids = dict(zip(words, object_token_ids(tokenizer, words)))
        target = torch.tensor([ids[p.target] for p in pairs])
        return cls(base, make_batch(tokenizer, [p.source for p in pairs]), target)


@torch.no_grad()
def source_values(
    model: HookedTransformer,
    source: Batch,
    heads_at: Mapping[str, Sequence[Head]],
    batch_size: int = 32,
) -> dict[str, dict[Head, Float[Tensor, "n d_head"]]]:
    """`hook_z` of the heads in `heads_at[position]` at each source prompt's own `position`,
    for every position in one forward pass per chunk (on CPU)."""
    out: dict[str, dict[Head, list[Tensor]]] = {p: defaultdict(list) for p in heads_at}
    wanted = {p: sorted({layer for layer, _ in hs}) for p, hs in heads_at.items() if hs}
    if not wanted:
        return {p: {} for p in heads_at}
    stop = max(max(layers) for layers in wanted.values()) + 1
    for chunk in source.chunks(batch_size):
        stores: dict[str, dict[int, Tensor]] = {p: {} for p in wanted}
        hooks = [h for p, layers in wanted.items() for h in store_hooks("z", chunk.position(p), layers, stores[p])]
        model.run_with_hooks(chunk.input_ids.to(model.cfg.device), fwd_hooks=hooks, stop_at_layer=stop)
        for p in wanted:
            for layer, head in heads_at[p]:
                out[p][(layer, head)].append(stores[p][layer][:, head].float().cpu())
    return {p: {h: torch.cat(v) for h, v in out[p].items()} for p in heads_at}


@dataclass
class Resume:
    """What a patch at layers >= `layer` and positions >= `start` leaves unchanged in the base
    prompts, as the part of a `metrics.clean_run` that `metrics.resume` restarts from: the
    residual stream entering `layer`, and the keys and values of positions < `start` in every
    layer >= `layer`."""

    layer: int
    start: int
    run: CleanRun

    def take(self, idx: Int[Tensor, " m"]) -> "Resume":
        r = self.run
        run = CleanRun(
            None, {l: t[idx] for l, t in r.resid.items()}, {l: t[idx] for l, t in r.keys.items()},
            {l: t[idx] for l, t in r.values.items()},
        )
        return Resume(self.layer, self.start, run)


def resume_bytes(model: HookedTransformer, n: int, seq: int, layer: int, start: int) -> int:
    """Memory a `Resume` of n prompts would take."""
    cfg = model.cfg
    kv_heads = cfg.n_key_value_heads or cfg.n_heads
    per_prompt = seq * cfg.d_model + 2 * start * (cfg.n_layers - layer) * kv_heads * cfg.d_head
    return n * per_prompt * torch.finfo(cfg.dtype).bits // 8


@torch.no_grad()
def resume_states(
    model: HookedTransformer,
    input_ids: Int[Tensor, "n seq"],
    specs: Sequence[tuple[int, int]],
    batch_size: int = 32,
) -> list[Resume]:
    """A `Resume` per (layer, start) in `specs`, all from one clean run per chunk."""
    parts: list[list[CleanRun]] = [[] for _ in specs]
    for chunk in input_ids.split(batch_size):
        run = clean_run(model, chunk)
        for i, (layer, start) in enumerate(specs):
            later = range(layer, model.cfg.n_layers)
            parts[i].append(CleanRun(
                None, {layer: run.resid[layer]}, {l: run.keys[l][:, :start] for l in later},
                {l: run.values[l][:, :start] for l in later},
            ))
    return [Resume(layer, start, _concat(runs)) for (layer, start), runs in zip(specs, parts)]


def _concat(runs: Sequence[CleanRun]) -> CleanRun:
    """Chunks of one clean run, joined along the batch."""
    def cat(field: str) -> dict[int, Tensor]:
        return {l: torch.cat([getattr(r, field)[l] for r in runs]) for l in getattr(runs[0], field)}

    return CleanRun(None, cat("resid"), cat("keys"), cat("values"))


@dataclass
class PairData:
    """One group's view of tokenized pairs: base prompts, the group's position in each base, the
    last token, the desideratum's target id, the source values of the group's heads (in head
    order) and, optionally, the base prompts' `Resume` state."""

    input_ids: Int[Tensor, "n seq"]
    position: Int[Tensor, " n"]
    last: Int[Tensor, " n"]
    target: Int[Tensor, " n"]
    values: Float[Tensor, "n k d_head"]
    resume: Resume | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, idx: Int[Tensor, " m"]) -> "PairData":
        resume = self.resume.take(idx) if self.resume is not None else None
        return PairData(
            self.input_ids[idx], self.position[idx], self.last[idx], self.target[idx], self.values[idx], resume
        )

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield self.take(torch.arange(start, min(start + size, len(self))))


def pair_data(
    model: HookedTransformer,
    pairs: Pairs,
    position: str,
    heads: Sequence[Head],
    values: Mapping[Head, Tensor] | None = None,
    batch_size: int = 32,
    resume: bool | Resume = True,
    max_resume_bytes: int = MAX_RESUME_BYTES,
) -> PairData:
    """PairData of one group at `position`. Reads the source values unless given; with
    `resume=True` also computes the base prompts' Resume state (if it fits in memory), or
    uses the given one."""
    heads = [tuple(map(int, h)) for h in heads]
    if values is None:
        values = source_values(model, pairs.source, {position: heads}, batch_size)[position]
    n, d = len(pairs), model.cfg.d_head
    stacked = torch.stack([values[h] for h in heads], dim=1) if heads else torch.zeros(n, 0, d)
    base = pairs.base
    data = PairData(base.input_ids, base.position(position), base.last, pairs.target, stacked)
    if isinstance(resume, Resume):
        data.resume = resume
    elif resume and heads:
        spec = resume_spec(heads, data.position)
        if resume_bytes(model, n, base.input_ids.shape[1], *spec) <= max_resume_bytes:
            data.resume = resume_states(model, base.input_ids, [spec], batch_size)[0]
    return data


def resume_spec(heads: Sequence[Head], positions: Int[Tensor, " n"]) -> tuple[int, int]:
    """(first layer, first position) a patch of `heads` at `positions` can change."""
    return min(layer for layer, _ in heads), int(positions.min())


# ---------------------------------------------------------------------------------------------
# The masked forward pass


def mask_hooks(
    heads: Sequence[Head],
    mask: Float[Tensor, " k"],
    values: Float[Tensor, "batch k d_head"],
    positions: Int[Tensor, " batch"],
    n_layers: int,
    n_heads: int,
) -> list[Hook]:
    """Hooks setting each group head's z at `positions` to m * z + (1 - m) * value:
    `hooks.patch_hooks` with weight 1 - m (differentiable in m)."""
    device = values.device
    layer_idx = torch.tensor([layer for layer, _ in heads], dtype=torch.long, device=device)
    head_idx = torch.tensor([head for _, head in heads], dtype=torch.long, device=device)
    weights = torch.zeros(n_layers, n_heads, device=device, dtype=mask.dtype)
    weights = weights.index_put((layer_idx, head_idx), 1 - mask.to(device))
    new: dict[int, Tensor] = {}
    for layer in sorted({layer for layer, _ in heads}):
        cols = [i for i, (l, _) in enumerate(heads) if l == layer]
        full = values.new_zeros(values.shape[0], n_heads, values.shape[2])
        full[:, [heads[i][1] for i in cols]] = values[:, cols]
        new[layer] = full
    return patch_hooks("z", new, positions, weights)


def masked_logits(
    model: HookedTransformer,
    heads: Sequence[Head],
    mask: Float[Tensor, " k"],
    data: PairData,
) -> Float[Tensor, "batch vocab"]:
    """Last-token logits of the base prompts with the group's heads mixed by `mask`; resumes
    from `data.resume` when present (same result, far fewer tokens and layers)."""
    device = model.cfg.device
    offset = data.resume.start if data.resume is not None else 0
    hooks = []
    if heads:
        hooks = mask_hooks(
            heads, mask, data.values.to(device, model.cfg.dtype), (data.position - offset).to(device),
            model.cfg.n_layers, model.cfg.n_heads,
        )
    if data.resume is None:
        logits = model.run_with_hooks(data.input_ids.to(device), fwd_hooks=hooks)
    else:
        logits = resume_with_grad(model, data.resume.run, data.resume.layer, data.resume.start, hooks)
    return logits_at(logits, (data.last - offset).to(device))


@torch.no_grad()
def patched_correct(
    model: HookedTransformer,
    heads: Sequence[Head],
    selected: Bool[Tensor, " k"],
    data: PairData,
    batch_size: int = 32,
) -> Bool[Tensor, " n"]:
    """Per pair: is the argmax the desideratum's target when the selected heads are patched
    from the source into the base (the group's other heads untouched)?"""
    mask = (~selected).float()
    return torch.cat(
        [masked_logits(model, heads, mask, chunk).argmax(-1).cpu() == chunk.target for chunk in data.chunks(batch_size)]
    )


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
# Training


@dataclass
class MaskResult:
    """One mask training: the final mask and the best rounded mask on the eval pairs."""

    heads: list[Head]  # the group's heads, in mask order
    mask: list[float]  # final clamped mask
    selected: list[Head]  # heads of the best rounded mask (m < 0.5: patched)
    eval_accuracy: float
    best_step: int  # 0: the initial mask (no head patched) was never beaten
    steps: int
    losses: list[float] = field(default_factory=list)

    def selected_mask(self) -> Bool[Tensor, " k"]:
        chosen = set(self.selected)
        return torch.tensor([h in chosen for h in self.heads], dtype=torch.bool)


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
    heads = [tuple(map(int, h)) for h in heads]
    scores: dict[tuple[bool, ...], float] = {}

    def score(selected: Bool[Tensor, " k"]) -> float:
        key = tuple(selected.tolist())
        if key not in scores:
            correct = patched_correct(model, heads, selected, eval, config.inference_batch_size)
            scores[key] = correct.float().mean().item()
        return scores[key]

    best = (score(torch.zeros(len(heads), dtype=torch.bool)), 0, torch.zeros(len(heads), dtype=torch.bool))
    if not heads:
        return MaskResult([], [], [], best[0], 0, 0)
    mask = torch.ones(len(heads), requires_grad=True)
    opt = torch.optim.Adam([mask], lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    losses: list[float] = []
    with frozen(model), tqdm(total=steps, desc="mask", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            for idx in torch.randperm(len(train), generator=generator).split(config.batch_size):
                chunk = train.take(idx)
                logits = masked_logits(model, heads, mask, chunk)
                target = logits.gather(1, chunk.target.to(logits.device)[:, None]).mean()
                loss = -target + config.lam * (1 - mask).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0, 1)
                losses.append(loss.item())
                selected = mask.detach() < THRESHOLD
                acc = score(selected)
                if acc > best[0]:
                    best = (acc, len(losses), selected)
                bar.update()
    chosen = [h for h, s in zip(heads, best[2].tolist()) if s]
    return MaskResult(heads, mask.detach().tolist(), chosen, best[0], best[1], len(losses), losses)


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
# Many trainings: one pool of pairs per desideratum, shared by every group and seed


@dataclass(frozen=True)
class Job:
    """One mask training: a group's heads at its position, for one desideratum and seed."""

    heads: tuple[Head, ...]
    position: str
    desideratum: str
    seed: int


@dataclass(frozen=True)
class Plan:
    """What every job of a run shares: training settings, split sizes, boxes, the data seed."""

    config: DCMConfig = DCMConfig()
    sizes: tuple[int, int, int] = SPLIT_SIZES
    n_boxes: int = 7
    data_seed: int = 0

    def key(self, job: Job) -> str:
        """A string naming everything a job's result depends on (for reuse across reruns)."""
        c = self.config
        return json.dumps(
            {
                "heads": [list(h) for h in job.heads], "position": job.position, "desideratum": job.desideratum,
                "seed": job.seed, "lam": c.lam, "lr": c.lr, "epochs": c.epochs, "batch_size": c.batch_size,
                "sizes": list(self.sizes), "n_boxes": self.n_boxes, "data_seed": self.data_seed,
            },
            sort_keys=True,
        )


def run_jobs(
    model: HookedTransformer,
    tokenizer,
    vocab: Vocabulary,
    jobs: Iterable[Job],
    plan: Plan = Plan(),
    done: Mapping[str, dict] | None = None,
    on_result: Callable[[str, dict], None] | None = None,
    progress: bool = True,
    max_resume_bytes: int = MAX_RESUME_BYTES,
) -> dict[str, dict]:
    """Run every job whose key is not in `done`; return key -> result for all jobs.

    Pairs come from `draw_splits(..., plan.data_seed)`: every desideratum shares the same base
    prompts, so the bases are tokenized and run once for all jobs, and each desideratum adds one
    source pass. The test pairs are fixed; each job's seed splits the train + eval pairs anew
    into its own train / eval sets and orders the training batches, so seeds differ in data and
    order. A result is a JSON-ready dict: selected heads, final mask, eval and test accuracy,
    the test pairs' correctness as a '0'/'1' string, steps, seconds. `on_result(key, result)` is
    called after each job (to save progress).
    """
    done = dict(done or {})
    jobs = list(dict.fromkeys(jobs))
    keys = {job: plan.key(job) for job in jobs}
    pending = [job for job in jobs if keys[job] not in done]
    if pending:
        _run(model, tokenizer, vocab, pending, plan, keys, done, on_result, progress, max_resume_bytes)
    return {keys[job]: done[keys[job]] for job in jobs}


def _run(model, tokenizer, vocab, pending, plan, keys, done, on_result, progress, max_resume_bytes) -> None:
    n_train, n_eval, _ = plan.sizes
    batch_size = plan.config.inference_batch_size
    by_desideratum: dict[str, list[Job]] = defaultdict(list)
    for job in pending:
        by_desideratum[job.desideratum].append(job)
    bar = tqdm(total=len(pending), desc="dcm masks", disable=not progress)
    bases: dict[str, Batch] = {}
    resumes: dict[tuple[str, Job], Resume] = {}
    for desideratum, group_jobs in by_desideratum.items():
        bar.set_postfix_str(desideratum)
        splits = draw_splits(builder(desideratum), vocab, plan.sizes, plan.n_boxes, plan.data_seed)
        parts = {"fit": splits.train + splits.eval, "test": splits.test}
        if not bases:  # the same base prompts for every desideratum: one tokenization, one pass
            bases = {name: make_batch(tokenizer, [p.base for p in pairs]) for name, pairs in parts.items()}
            resumes = _shared_resumes(model, bases, pending, max_resume_bytes, batch_size)
        tokenized = {name: Pairs.build(tokenizer, pairs, bases[name]) for name, pairs in parts.items()}
        heads_at: dict[str, set[Head]] = defaultdict(set)
        for job in group_jobs:
            heads_at[job.position].update(job.heads)
        wanted = {p: sorted(hs) for p, hs in heads_at.items()}
        values = {name: source_values(model, t.source, wanted, batch_size) for name, t in tokenized.items()}
        for job in group_jobs:
            start = time.perf_counter()
            fit, test = (
                pair_data(
                    model, tokenized[name], job.position, job.heads, values[name][job.position], batch_size,
                    resume=resumes.get((name, job)) or False,
                )
                for name in ("fit", "test")
            )
            order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(job.seed))
            train, eval = fit.take(order[:n_train]), fit.take(order[n_train : n_train + n_eval])
            result = train_mask(model, job.heads, train, eval, plan.config, job.seed)
            correct = patched_correct(model, job.heads, result.selected_mask(), test, batch_size)
            out = {
                "heads": [list(h) for h in result.selected],
                "mask": [round(m, 4) for m in result.mask],
                "eval_accuracy": result.eval_accuracy,
                "test_accuracy": correct.float().mean().item(),
                "test_correct": "".join("1" if c else "0" for c in correct.tolist()),
                "best_step": result.best_step,
                "steps": result.steps,
                "seconds": round(time.perf_counter() - start, 2),
            }
            done[keys[job]] = out
            if on_result is not None:
                on_result(keys[job], out)
            bar.update()
    bar.close()


def _shared_resumes(
    model: HookedTransformer,
    bases: Mapping[str, Batch],
    jobs: Sequence[Job],
    max_resume_bytes: int,
    batch_size: int,
) -> dict[tuple[str, Job], Resume]:
    """Resume states of every job on every base batch, from one pass per batch (jobs that
    would not fit in `max_resume_bytes` together run the full forward instead)."""
    out: dict[tuple[str, Job], Resume] = {}
    for name, batch in bases.items():
        n, seq = batch.input_ids.shape
        specs: dict[tuple[int, int], list[Job]] = defaultdict(list)
        for job in jobs:
            if job.heads:
                specs[resume_spec(job.heads, batch.position(job.position))].append(job)
        budget, chosen = max_resume_bytes, []
        for spec in specs:
            size = resume_bytes(model, n, seq, *spec)
            if size <= budget:
                chosen.append(spec)
                budget -= size
        for spec, resume in zip(chosen, resume_states(model, batch.input_ids, chosen, batch_size)):
            for job in specs[spec]:
                out[(name, job)] = resume
    return out
