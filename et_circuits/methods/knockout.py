"""Attention knockout: block attention edges (query position -> key position, per example) in
every head of layers L and above, and read accuracy as a function of L. An edge the model
needs stops mattering once L passes the layers that use it, so accuracy climbs back to the full
model's there.

Blocking sets the pre-softmax score to -inf (`hooks.block_hooks`), so the other keys share the
attention the blocked one had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.distributed import mine, sum_counts
from et_circuits.core.hooks import block_hooks, logits_at
from et_circuits.core.metrics import n_correct
from et_circuits.core.prompts import LAST, PromptSet
from et_circuits.core.restart import clean_run, run_suffix
from et_circuits.core.settings import QUIET, RunSettings


@dataclass(frozen=True)
class Edge:
    """Attention from each prompt's `query` position to its `key` position (position specs of
    single positions)."""

    name: str
    query: str
    key: str


@torch.no_grad()
def knockout(
    model: HookedTransformer,
    prompts: PromptSet,
    edges: Sequence[Edge],
    settings: RunSettings = QUIET,
) -> tuple[float, dict[str, list[float]]]:
    """Full accuracy, and per edge the accuracy with that edge blocked from layer L on, for
    L = 0 .. n_layers - 1. Each blocked run recomputes only layers >= L at positions from the
    edge's query on (`restart.run_suffix`): nothing else can change."""
    n_layers = model.cfg.n_layers
    where = {e.name: (prompts.position(e.query), prompts.position(e.key)) for e in edges}
    hits = {e.name: [0] * n_layers for e in edges}
    full = 0
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc="knockout", disable=not settings.progress, leave=False):
        chunk = prompts[start : start + settings.batch_size].to(model.cfg.device)
        last = chunk.position(LAST)
        run = clean_run(model, chunk.input_ids)
        full += n_correct(logits_at(run.logits, last), chunk.answers)
        for j in mine(len(edges) * n_layers):  # under torchrun, this rank's (edge, layer)s
            e, layer = edges[j // n_layers], j % n_layers
            queries, keys = (p[start : start + settings.batch_size].to(last.device) for p in where[e.name])
            first = int(queries.min())
            hooks = block_hooks(queries, keys, range(layer, n_layers), first)
            logits = run_suffix(model, run, layer, first, hooks, read_at=last - first)
            hits[e.name][layer] += n_correct(logits, chunk.answers)
    n = len(prompts)
    counts = sum_counts([h for e in edges for h in hits[e.name]])
    return full / n, {e.name: [h / n for h in counts[i * n_layers : (i + 1) * n_layers]] for i, e in enumerate(edges)}
