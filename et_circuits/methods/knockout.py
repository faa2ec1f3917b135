"""Attention knockout: block attention edges (query position -> key position, per example) in
every head of layers L and above, and read a metric (accuracy by default) as a function of L. An edge the model
needs stops mattering once L passes the layers that use it, so the metric climbs back to the
full model's there.

Blocking sets the pre-softmax score to -inf (`hooks.block_hooks`), so the other keys share the
attention the blocked one had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.distributed import combine_nan, mine
from et_circuits.core.hooks import block_hooks, logits_at
from et_circuits.core.metrics import Metric, accuracy, metric_name, metric_total
from et_circuits.core.prompts import LAST, PromptSet
from et_circuits.core.restart import clean_run, run_suffix
from et_circuits.core.serial import frame, number
from et_circuits.core.settings import QUIET, RunSettings


@dataclass(frozen=True)
class Edge:
    """Attention from each prompt's `query` position to its `key` position (position specs of
    single positions)."""

    name: str
    query: str
    key: str


@dataclass(frozen=True)
class Knockout:
    """Attention knockout's result: `metric` of the unblocked model (`full`) and, per edge, of
    the model with that edge blocked from layer L on, for L = 0 .. n_layers - 1 (`curves`), on
    `n` prompts."""

    full: float
    curves: dict[str, tuple[float, ...]]
    n: int
    metric: str = "accuracy"

    __hash__ = None

    def to_frame(self):
        """One row per (edge, first blocked layer): edge, from_layer, value, full."""
        rows = [
            {"edge": edge, "from_layer": layer, "value": value, "full": self.full}
            for edge, values in self.curves.items()
            for layer, value in enumerate(values)
        ]
        return frame(rows, ["edge", "from_layer", "value", "full"])

    def to_json(self) -> dict:
        return {
            "full": self.full,
            "curves": {e: list(v) for e, v in self.curves.items()},
            "n": self.n,
            "metric": self.metric,
        }

    @classmethod
    def from_json(cls, d: dict) -> Knockout:
        return cls(d["full"], {e: tuple(v) for e, v in d["curves"].items()}, d["n"], d["metric"])

    def __repr__(self) -> str:
        lowest = []
        for edge, values in self.curves.items():
            layer = min(range(len(values)), key=values.__getitem__) if values else 0
            lowest.append(f"{edge} {number(values[layer])} (from L{layer})" if values else edge)
        return (
            f"Knockout({self.metric} {number(self.full)} unblocked, n={self.n}; lowest when blocked: "
            f"{', '.join(lowest) or 'no edges'})"
        )


@torch.no_grad()
def knockout(
    model: HookedTransformer,
    prompts: PromptSet,
    edges: Sequence[Edge],
    *,
    metric: Metric = accuracy,
    settings: RunSettings = QUIET,
) -> Knockout:
    """`metric` (default accuracy) of the unblocked model, and per edge with that edge blocked
    from layer L on, for L = 0 .. n_layers - 1. Each blocked run recomputes only layers >= L at
    positions from the edge's query on (`restart.run_suffix`): nothing else can change."""
    n_layers = model.cfg.n_layers
    prompts.check_vocab(model.cfg.d_vocab)
    where = {e.name: (prompts.position(e.query), prompts.position(e.key)) for e in edges}
    totals = torch.full((len(edges) * n_layers,), float("nan"), dtype=torch.float64)  # n x metric, this rank's
    full = 0.0
    costs = [n_layers - j % n_layers for j in range(len(edges) * n_layers)]  # blocked from L: layers L.. rerun
    chunks = range(0, len(prompts), settings.batch_size)
    for start in tqdm(chunks, desc="knockout", disable=not settings.progress, leave=False):
        chunk = prompts[start : start + settings.batch_size].to(model.cfg.device)
        last = chunk.position(LAST)
        run = clean_run(model, chunk.input_ids)
        full += metric_total(metric, logits_at(run.logits, last), chunk)
        for j in mine(len(edges) * n_layers, costs):  # under torchrun, this rank's (edge, layer)s
            e, layer = edges[j // n_layers], j % n_layers
            queries, keys = (p[start : start + settings.batch_size].to(last.device) for p in where[e.name])
            first = int(queries.min())
            hooks = block_hooks(queries, keys, range(layer, n_layers), first)
            logits = run_suffix(model, run, layer, first, hooks, read_at=last - first)
            totals[j] = totals[j].nan_to_num(0.0) + metric_total(metric, logits, chunk)
    n = len(prompts)
    values = (combine_nan(totals) / n).tolist()
    curves = {e.name: tuple(values[i * n_layers : (i + 1) * n_layers]) for i, e in enumerate(edges)}
    return Knockout(full / n, curves, n, metric_name(metric))
