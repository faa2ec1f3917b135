"""The paper's attention-knockout edges as a recipe: from the last token to the correct object
and to the query label, from the query label to its earlier occurrence, to a random context
token (the control), and to where a discovered circuit's groups act."""

from __future__ import annotations

import random

import torch

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import DataError
from et_circuits.core.prompts import PromptSet
from et_circuits.methods.knockout import Edge

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


def edges_to(circuit: Circuit, prompts: PromptSet) -> list[Edge]:
    """Knockout edges from the last token to each single position a circuit's groups act at
    before it (a discovered circuit's positions: where the last token's heads read). An edge
    blocks one key per prompt, so positions that are sets in `prompts` (e.g. "labels+1", every
    label's next token) are left out."""

    def single(spec) -> bool:
        try:
            prompts.position(spec)
            return True
        except DataError:
            return False

    specs = dict.fromkeys(p for g in circuit.groups for p in circuit.positions_of(g) if p != "last")
    return [Edge(f"last->{spec}", "last", spec) for spec in specs if single(spec)]


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
