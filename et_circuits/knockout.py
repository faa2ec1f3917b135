"""Attention knockout: block one attention edge (query position -> key position, per example)
in every head of layers L and above, and read accuracy as a function of L. An edge the model
needs stops mattering once L passes the layers that use it, so accuracy climbs back to the full
model's there.

Edges: last token -> correct object, last token -> query label, query label -> previous query
label, and a control: last token -> a random context token (not BOS, not the correct object,
not the previous query label). Blocking sets the pre-softmax score to -inf (`hook_attn_scores`,
after the causal mask), so the other keys share the attention the blocked one had.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from .data import Batch, DataError
from .hooks import Hook
from .metrics import clean_run, n_correct, resume

EDGES = ("last->object", "last->query_label", "query_label->prev_query_label", "last->random")
EDGE_TITLES = {
    "last->object": "last token → correct object",
    "last->query_label": "last token → query label",
    "query_label->prev_query_label": "query label → previous query label",
    "last->random": "last token → random context token (control)",
}


def _block_hook(
    scores: Float[Tensor, "batch head query key"],
    hook: HookPoint,
    queries: Int[Tensor, " batch"],
    keys: Int[Tensor, " batch"],
) -> Float[Tensor, "batch head query key"]:
    rows = torch.arange(scores.shape[0], device=scores.device)
    scores = scores.clone()
    scores[rows, :, queries.to(scores.device), keys.to(scores.device)] = float("-inf")
    return scores


def block_hooks(
    queries: Int[Tensor, " batch"], keys: Int[Tensor, " batch"], layers: Iterable[int], start: int = 0
) -> list[Hook]:
    """Hooks stopping every head of `layers` from attending from queries[b] to keys[b].

    `start`: the first query position the run computes (a `metrics.resume` suffix run), so the
    query axis is shifted by it while the key axis keeps full positions.
    """
    if (keys >= queries).any():
        raise DataError("a blocked key must come before its query (causal attention)")
    if (queries < start).any():
        raise DataError(f"a blocked query lies before the run's first position {start}")
    hook = partial(_block_hook, queries=queries - start, keys=keys)
    return [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in layers]


def query_objects(batch: Batch) -> Int[Tensor, " batch"]:
    """Position of each prompt's correct object (the queried box's object)."""
    index = torch.tensor([s.query for s in batch.samples], device=batch.objects.device)
    return batch.objects[torch.arange(len(batch), device=index.device), index]


def random_context(batch: Batch, seed: int) -> Int[Tensor, " batch"]:
    """Per prompt, a seeded random context token (after BOS, up to the last object or label)
    that is neither the correct object nor the previous query label."""
    rng = random.Random(seed)
    objects = query_objects(batch).tolist()
    out = []
    for b in range(len(batch)):
        end = int(max(batch.objects[b].max(), batch.labels[b].max()))
        avoid = {objects[b], int(batch.prev_query_label[b])}
        choices = [p for p in range(1, end + 1) if p not in avoid]
        if not choices:
            raise DataError("prompt too short for a random-position control")
        out.append(rng.choice(choices))
    return torch.tensor(out)


def edge_positions(batch: Batch, edge: str, seed: int = 0) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """(query positions, key positions) of one named edge for every prompt of `batch`."""
    if edge == "last->object":
        return batch.last, query_objects(batch)
    if edge == "last->query_label":
        return batch.last, batch.query_label
    if edge == "query_label->prev_query_label":
        return batch.query_label, batch.prev_query_label
    if edge == "last->random":
        return batch.last, random_context(batch, seed)
    raise DataError(f"unknown edge {edge!r}; expected one of {', '.join(EDGES)}")



@torch.no_grad()
def knockout_accuracy(
    model: HookedTransformer,
    batch: Batch,
    edges: Iterable[str] = EDGES,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[float, dict[str, list[float]]]:
    """Full accuracy, and per edge the accuracy with that edge blocked from layer L on, for
    L = 0 .. n_layers - 1. Each blocked run recomputes only layers >= L at positions from the
    edge's query on (`metrics.resume`): nothing else can change."""
    n_layers = model.cfg.n_layers
    edges = list(edges)
    where = {e: edge_positions(batch, e, seed) for e in edges}
    hits = {e: [0] * n_layers for e in edges}
    full = 0
    for start in tqdm(range(0, len(batch), batch_size), desc="knockout", disable=not progress, leave=False):
        chunk = batch[start : start + batch_size].to(model.cfg.device)
        run = clean_run(model, chunk.input_ids)
        full += n_correct(run.logits, chunk.last, chunk.answer)
        for e in edges:
            queries, keys = (p[start : start + batch_size] for p in where[e])
            first = int(queries.min())
            for layer in range(n_layers):
                hooks = block_hooks(queries, keys, range(layer, n_layers), first)
                logits = resume(model, run, layer, first, hooks)
                hits[e][layer] += n_correct(logits, chunk.last - first, chunk.answer)
    n = len(batch)
    return full / n, {e: [h / n for h in hits[e]] for e in edges}


def result_rows(model_name: str, full: float, curves: dict[str, list[float]], n: int) -> list[dict]:
    """CSV rows: one per (edge, first blocked layer)."""
    return [
        {
            "model": model_name,
            "edge": edge,
            "from_layer": layer,
            "accuracy": round(acc, 4),
            "full_accuracy": round(full, 4),
            "n": n,
        }
        for edge, accs in curves.items()
        for layer, acc in enumerate(accs)
    ]


def knockout_figure(frame):
    """Accuracy vs the first blocked layer, one line per edge; dashed: the unblocked model."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for edge, rows in frame.groupby("edge", sort=False):
        fig.add_trace(
            go.Scatter(x=rows["from_layer"], y=rows["accuracy"], mode="lines+markers", name=EDGE_TITLES.get(edge, edge))
        )
    full = float(frame["full_accuracy"].iloc[0])
    fig.add_hline(y=full, line_dash="dash", line_color="grey", annotation_text=f"no knockout {full:.2f}")
    model = ", ".join(dict.fromkeys(frame["model"]))
    fig.update_layout(
        title=f"Attention knockout in {model}<br><sup>one edge blocked in every head of layers L and above</sup>",
        xaxis_title="first blocked layer L", yaxis_title="accuracy", yaxis_range=[0, 1.05],
        xaxis=dict(dtick=1 if frame["from_layer"].max() < 16 else None),
        template="plotly_white", height=480, width=700, legend=dict(orientation="h", y=-0.2),
    )
    return fig
