"""The DCM runs behind the paper's Figure 2 as a recipe: which desiderata each group is asked,
the seeded splits of counterfactual pairs (every desideratum on the same base prompts), and the
reuse of finished trainings across reruns."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from transformer_lens import HookedTransformer

import et_circuits.methods.dcm as dcm_method
from et_circuits.core.circuit import Circuit
from et_circuits.core.prompts import Spec
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Head

from .. import data, desiderata

EXTRA_GROUP = "pos_transmitter"  # the group the extra desiderata test (group B)


@dataclass(frozen=True)
class DCMPlan:
    """What every DCM training of a run shares: mask-training settings, split sizes (train,
    eval, test), boxes, the seed of the pairs, the training seeds, and the resampling."""

    config: dcm_method.DCMConfig = dcm_method.DCMConfig()
    sizes: tuple[int, int, int] = desiderata.SPLIT_SIZES
    n_boxes: int = 7
    data_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    resamples: int = 10
    resample_seed: int = 0


@dataclass(frozen=True)
class Ask:
    """One DCM question of the paper: a group's heads at its position (or position set), on one
    desideratum."""

    heads: tuple[Head, ...]
    position: Spec
    desideratum: str


AskLookup = Callable[[Ask, int], "dcm_method.SeedResult | None"]  # (ask, seed) -> an earlier training
AskDone = Callable[[Ask, int, dcm_method.SeedResult], None]


def asks_for(circuit: Circuit, desiderata_of: Mapping[str, Sequence[str]]) -> list[tuple[str, Ask]]:
    """(group, ask) for every group of `circuit` in `desiderata_of` and each of its desiderata,
    at the group's own positions."""
    return [
        (group, Ask(tuple(sorted(heads)), circuit.positions[group], name))
        for group, heads in circuit.groups.items()
        for name in desiderata_of.get(group, ())
    ]


def run_dcm(
    model: HookedTransformer,
    tokenizer,
    asks: Sequence[Ask],
    plan: DCMPlan = DCMPlan(),
    *,
    settings: RunSettings = QUIET,
    finished: AskLookup | None = None,
    on_seed: AskDone | None = None,
) -> dict[Ask, dcm_method.DCMResult]:
    """DCM for every ask with the paper's protocol (accuracy). Pairs come from
    `draw_splits(..., plan.data_seed)`: every desideratum shares the same base prompts
    (tokenized and run once); the test pairs are fixed, and each seed splits the train + eval
    pairs anew. `finished(ask, seed)` may return an earlier training, which is reused instead
    of retrained; `on_seed(ask, seed, result)` is called after each training."""
    asks = list(dict.fromkeys(asks))
    earlier = {(a, s): finished(a, s) for a in asks for s in plan.seeds} if finished is not None else {}
    earlier = {key: result for key, result in earlier.items() if result is not None}
    pending = [a for a in asks if any((a, s) not in earlier for s in plan.seeds)]
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

    def saved(i: int, seed: int, result: dcm_method.SeedResult) -> None:
        if on_seed is not None:
            on_seed(pending[i], seed, result)

    computed = dcm_method.dcm_many(
        model,
        questions,
        n_train=n_train,
        n_eval=n_eval,
        seeds=plan.seeds,
        config=plan.config,
        resamples=plan.resamples,
        resample_seed=plan.resample_seed,
        settings=settings,
        finished=lambda i, seed: earlier.get((pending[i], seed)),
        on_seed=saved,
    )
    results = dict(zip(pending, computed))
    for a in asks:
        if a not in results:  # every seed finished earlier
            seeds = {s: earlier[(a, s)] for s in plan.seeds}
            results[a] = dcm_method.summarize(
                a.heads, a.position, seeds, resamples=plan.resamples, resample_seed=plan.resample_seed
            )
    return {a: results[a] for a in asks}
