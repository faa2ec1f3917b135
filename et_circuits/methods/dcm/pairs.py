"""DCM's data: counterfactual `Pairs` (base prompts whose answers are the targets, and one
source prompt each) and their prepared form for one head set (`PairData`): the base prompts,
the positions the heads act at, the source's values of the heads there and, where memory
allows, the base prompts' clean run to restart from."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from et_circuits.core.errors import DataError
from et_circuits.core.hooks import store_hooks
from et_circuits.core.prompts import LAST, PromptSet, Spec
from et_circuits.core.restart import CleanRun, earliest, restart_bytes, restarts
from et_circuits.core.types import Head

MAX_RESTART_BYTES = 2 * 1024**3  # the most memory the clean runs kept for restarts may take


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

    def __getitem__(self, index) -> Pairs:
        return Pairs(self.base[index], self.source[index])


@dataclass(frozen=True)
class Question:
    """One DCM question: which of `heads` at `position` carry what the pairs test. `fit` pairs
    are split by each seed into train and eval; `test` pairs give the reported score."""

    heads: tuple[Head, ...]
    position: Spec
    fit: Pairs
    test: Pairs


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
    wrong: Int[Tensor, "n w"] | None = None  # the base prompts' wrong answers, where they have them

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def prompts(self) -> PromptSet:
        """The base prompts as a PromptSet whose answers are the targets: what a metric reads."""
        return PromptSet(self.input_ids, self.target, {LAST: self.last}, wrong_answers=self.wrong)

    def take(self, idx: Int[Tensor, " m"]) -> PairData:
        run = self.run.take(idx) if self.run is not None else None
        wrong = None if self.wrong is None else self.wrong[idx]
        return PairData(
            self.input_ids[idx],
            self.position[idx],
            self.last[idx],
            self.target[idx],
            self.values[idx],
            run,
            self.restart,
            wrong,
        )

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield self.take(torch.arange(start, min(start + size, len(self))))

    @staticmethod
    def concat(parts: Sequence[PairData]) -> PairData:
        """Pairs of the same base prompts' layout (and restart point) as one batch."""
        if len({p.restart for p in parts}) > 1 or len({p.run is None for p in parts}) > 1:
            raise DataError("pairs joined into one batch need the same restart point")
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        run = None if parts[0].run is None else CleanRun.concat([p.run for p in parts])
        wrong = None if any(p.wrong is None for p in parts) else cat("wrong")
        return PairData(
            cat("input_ids"), cat("position"), cat("last"), cat("target"), cat("values"), run, parts[0].restart, wrong
        )


def restart_point(heads: Sequence[Head], positions: Int[Tensor, "n slots"]) -> tuple[int, int]:
    """(first layer, first position) a patch of `heads` at `positions` can change."""
    return min(layer for layer, _ in heads), int(earliest(positions).min())


def prepare_pairs(
    model: HookedTransformer,
    pairs: Pairs,
    position: Spec,
    heads: Sequence[Head],
    *,
    values: Mapping[Head, Tensor] | None = None,
    run: CleanRun | bool = True,
    batch_size: int = 32,
    max_restart_bytes: int = MAX_RESTART_BYTES,
) -> PairData:
    """PairData of `heads` at `position`. Reads the source values unless given; with
    `run=True` also makes the base prompts' restricted clean run (if it fits in memory), or
    uses the given one (`run=False`: full forwards)."""
    heads = [tuple(map(int, h)) for h in heads]
    pairs.base.check_vocab(model.cfg.d_vocab), pairs.source.check_vocab(model.cfg.d_vocab)
    if values is None:
        values = source_values(model, pairs.source, {position: heads}, batch_size)[position]
    base = pairs.base
    at = base.position_set(position)
    if heads and pairs.source.position_set(position).shape[1] != at.shape[1]:
        raise DataError(f"source and base prompts have different numbers of {position!r} positions")
    n, d = len(pairs), model.cfg.d_head
    stacked = torch.stack([values[h] for h in heads], dim=2) if heads else torch.zeros(n, at.shape[1], 0, d)
    data = PairData(base.input_ids, at, base.position(LAST), pairs.target, stacked, wrong=base.wrong_answers)
    if heads and run is not False:
        data.restart = restart_point(heads, data.position)
        if isinstance(run, CleanRun):
            data.run = run
        elif restart_bytes(model, n, base.seq_len, *data.restart) <= max_restart_bytes:
            data.run = restarts(model, base.input_ids, [data.restart], batch_size)[0]
        else:
            data.restart = None
    return data
