"""The DCM runs behind the paper's Figure 2 as a recipe: which desiderata each group is asked,
the seeded splits of counterfactual pairs (every desideratum on the same base prompts), and the
reuse of finished trainings across reruns."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
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
    """What every DCM training of a run shares: settings, split sizes, boxes, seeds."""

    config: dcm_method.DCMConfig = dcm_method.DCMConfig()
    sizes: tuple[int, int, int] = desiderata.SPLIT_SIZES
    n_boxes: int = 7
    data_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    resamples: int = 10
    resample_seed: int = 0

    def key(self, ask: Ask, seed: int) -> str:
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
