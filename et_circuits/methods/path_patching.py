"""Path patching (Wang et al. 2023): how much each sender head's output at a position matters,
directly or through chosen receivers (`discovery.find_circuit` chains such sweeps into circuit
discovery).

A sender head S is scored at a sender position P (a position spec; a position set patches S at
every position of the set). In the *frozen run* (clean prompt) every head at every position is
frozen to its clean `hook_z`, except S at P, which takes its value from the paired corrupt
prompt; MLPs stay free. Without receivers the metric reads the frozen run's logits at the last
position (the direct effect). With receivers, each receiver's input (`hook_q` / `hook_k` /
`hook_v`, before any q/k norm and rotary) at its position is recorded from the frozen run and
patched into a fresh clean run (the *receiver run*), whose last position the metric reads.
score = metric(patched) - metric(clean), divided by metric(clean) when `relative`.

The default metric is the relative change of the mean answer probability,
(mean p_patched - mean p_clean) / mean p_clean. (Averaging the per-prompt ratio instead, as some
papers do, is unbounded: a prompt the model gets wrong with p_clean ~ 1e-6 adds a ratio of
thousands and decides the ranking alone.)

Two methods give the same scores (tested to 1e-5 in fp32):

- `reference`: two full forward passes per sender head, as the authors' code does.
- `fast` (default) uses what the freeze allows. Cost model, per step:
  * Frozen run: every head is frozen, so nothing moves between positions; only the residual
    stream at P changes, and only from the sender's layer on. It is a pass over the |P| sender
    positions alone, from the clean `resid_pre` there (below the sender the frozen run is the
    clean one): |P| tokens x (layers from the sender's up to the last receiver's).
  * Receiver run: only positions >= min P and layers from the lowest receiver above the sender
    can change. It restarts there from the clean residual stream of those positions, with the
    clean keys and values of the earlier positions as a frozen KV cache: (last - min P + 1)
    tokens x (layers from that receiver's up). A sender at or above every receiver's layer
    cannot reach one (score 0); a receiver at a position outside P keeps its clean input.
  * The senders of a layer share each pass (one batch row per sender and prompt); prompts are
    grouped by min P, so a group's suffix starts there. The clean and corrupt runs are made
    once for every step (`prepared.prepare_runs`), each corrupt run from its first changed token.
  So a step whose receivers sit at the last token recomputes one token per sender row; a step
  whose senders sit early in the prompt recomputes every position from there to the last for
  each sender below the receivers. Both passes are `restart.run_from` (the frozen run with an
  empty prefix), which moves the residual stream and each layer's cache to that layer's device
  in a model split over GPUs.

A third method, `attribution`, estimates every score to first order in one backward pass
(`attribution`'s module doc); it is an estimate, so discovery verifies it with `fast`.

With grouped-query attention, `hook_k` / `hook_v` are made per query head for the duration
(TransformerLens' `ungroup_grouped_query_attention`), so a receiver's input is its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core import serial
from et_circuits.core.circuit import head_mask
from et_circuits.core.distributed import combine_nan, mine
from et_circuits.core.errors import CircuitError
from et_circuits.core.hooks import (
    at_positions,
    gather,
    hook_name,
    logits_at,
    override_hooks,
    patch_hooks,
    per_head_values,
    store_hooks,
)
from et_circuits.core.metrics import Metric, answer_prob, metric_name, metric_total, score_of
from et_circuits.core.prepared import PreparedRuns, prepare_runs
from et_circuits.core.prompts import LAST, PromptSet, Spec, spec_text
from et_circuits.core.restart import earliest, run_from, same_start_chunks, tile
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.sites import Sites, match_slots
from et_circuits.core.types import PATH_PATCHING_METHODS, Head, Receiver

from .attribution import ESTIMATE, attribution_scores, attribution_total

METHODS = (*PATH_PATCHING_METHODS, ESTIMATE)  # the exact methods, then the gradient estimate


# ---------------------------------------------------------------------------------------------
# Reference: two full forward passes per sender


@torch.no_grad()
def _reference_chunk(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    sender_position: str,
    sites: Sites,
    senders: Bool[Tensor, "layer head"],
    metric: Metric,
) -> tuple[Float[Tensor, "layer head"], float]:
    """n x metric of every sender's patched runs on one chunk (NaN for non-senders), and n x
    the clean metric. Per sender: the frozen run on the whole prompt (stopped after the last
    receiver's layer when there are receivers), then the receiver run on the whole prompt."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    ids, last = clean.input_ids, clean.position(LAST)
    at = clean.position_set(sender_position)
    z_names = [hook_name("z", layer) for layer in range(n_layers)]
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n in z_names)
    clean_total = metric_total(metric, logits_at(logits, last), clean)
    clean_z = {layer: cache[hook_name("z", layer)] for layer in range(n_layers)}
    del cache
    corrupt_z = gather(model, corrupt.input_ids, "z", at)  # layer -> batch k head d
    rows, slots = (at >= 0).nonzero(as_tuple=True)  # every (prompt, slot) with a position
    receiver_layers = sites.layers
    out = torch.full((n_layers, n_heads), float("nan"), dtype=torch.float64)
    for layer, head in senders.nonzero().tolist():
        values = dict(clean_z)
        values[layer] = clean_z[layer].clone()
        r, j = rows.to(values[layer].device), slots.to(values[layer].device)
        values[layer][r, at.to(r.device)[r, j], head] = corrupt_z[layer][r, j, head]
        frozen = override_hooks("z", values)
        if not sites.masks:
            logits = model.run_with_hooks(ids, fwd_hooks=frozen)
        else:
            hooks = []
            for (kind, spec), mask in sites.masks.items():
                where = clean.position_set(spec)
                recorded = gather(model, ids, kind, where, receiver_layers, fwd_hooks=frozen)
                hooks += patch_hooks(kind, recorded, where, mask.to(ids.device))
            logits = model.run_with_hooks(ids, fwd_hooks=hooks)
        out[layer, head] = metric_total(metric, logits_at(logits, last), clean)
    return out, clean_total


# ---------------------------------------------------------------------------------------------
# Fast: sender-position frozen runs, suffix receiver runs, many senders per pass


@torch.no_grad()
def _fast_chunk(
    model: HookedTransformer,
    runs: PreparedRuns,
    clean: PromptSet,
    sender_position: str,
    sites: Sites,
    senders: Bool[Tensor, "layer head"],
    sender_batch: int,
    metric: Metric,
) -> tuple[Float[Tensor, "layer head"], float]:
    """n x metric of every sender's patched run on one chunk and n x the clean metric, as
    `_reference_chunk`, computed
    with the shortcuts in the module doc from this chunk's `runs`; up to `sender_batch`
    senders of one layer share a forward."""
    n_layers, n_heads, n_kv = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads or model.cfg.n_heads
    n, device = len(clean), clean.device
    last = clean.position(LAST)
    at = clean.position_set(sender_position)  # n k
    k = at.shape[1]
    clean_z, corrupt_z = runs.clean_at["z"][sender_position], runs.corrupt_z[sender_position]
    receiver_layers = sites.layers
    out = torch.full((n_layers, n_heads), float("nan"), dtype=torch.float64)
    clean_value = metric_total(metric, runs.last_logits, clean)
    todo = [tuple(h) for h in senders.nonzero().tolist()]  # sorted by layer, then head
    if sites.masks:  # a sender at or above every receiver cannot reach one (`path_patch` scores it 0)
        todo = [h for h in todo if h[0] < receiver_layers[-1]]
    by_layer: dict[int, list[Head]] = {}
    for layer, head in todo:
        by_layer.setdefault(layer, []).append((layer, head))
    groups = [heads[i : i + sender_batch] for heads in by_layer.values() for i in range(0, len(heads), sender_batch)]
    x_clean = runs.run.resid  # layer -> n seq d
    for g in mine(len(groups)):  # under torchrun, this rank's share of the batches
        group = groups[g]
        reps, first = len(group), group[0][0]
        stop = n_layers if not sites.masks else receiver_layers[-1] + 1
        # Frozen run at the sender positions only, from the senders' layer: every head clean,
        # except each row's sender, corrupt.
        frozen = {m: tile(clean_z[m], reps).view(reps, n, k, n_heads, -1) for m in range(first, stop)}
        for r, (layer, head) in enumerate(group):
            frozen[layer][r, :, :, head] = corrupt_z[layer][:, :, head]
        frozen = {m: v.view(reps * n, k, n_heads, -1) for m, v in frozen.items()}
        x = tile(at_positions(x_clean[first], at), reps)  # rows k d_model
        # The sender positions as a sequence of their own (no prefix): attention does not matter there, every z is set.
        alone = {m: x.new_zeros(1, 0, n_kv, model.cfg.d_head) for m in range(first, stop)}
        if not sites.masks:
            logits = run_from(model, x, first, alone, alone, override_hooks("z", frozen))
            slot = match_slots(at, last[:, None])[:, 0]  # where the last position is a sender position
            picked = logits_at(logits, tile(slot.clamp(min=0), reps))
            logits = torch.where(
                tile(slot >= 0, reps)[:, None].to(picked.device), picked, tile(runs.last_logits, reps).to(picked.dtype)
            )
        else:
            above = [m for m in receiver_layers if m > first]
            recorded: dict[str, dict[int, Tensor]] = {kind: {} for kind, _ in sites.masks}
            every_slot = torch.arange(k, device=device).expand(reps * n, k)
            store = [h for kind in recorded for h in store_hooks(kind, every_slot, above, recorded[kind])]
            run_from(model, x, first, alone, alone, [*override_hooks("z", frozen), *store], stop_at_layer=stop)
            # Receiver run: positions start..end, from the lowest receiver above the senders.
            start, end = int(earliest(at).min()), int(last.max()) + 1
            hooks = []
            for (kind, spec), mask in sites.masks.items():
                # Each receiver slot takes the frozen run's input: recorded at the sender slot
                # at the same position, and the clean input elsewhere.
                where = clean.position_set(spec)  # n m
                slot = tile(match_slots(at, where), reps).view(reps, n, -1)
                values = {}
                for m, v in recorded[kind].items():
                    v, slot = v.view(reps, n, k, n_heads, -1), slot.to(v.device)
                    index = slot.clamp(min=0)[..., None, None]
                    frozen_in = torch.gather(v, 2, index.expand(-1, -1, -1, n_heads, v.shape[-1]))
                    clean_in = runs.clean_at[kind][spec][m][None].to(v.dtype)
                    values[m] = torch.where(slot[..., None, None] >= 0, frozen_in, clean_in).view(
                        reps * n, -1, n_heads, v.shape[-1]
                    )
                shifted = torch.where(where >= 0, where - start, where)
                hooks += patch_hooks(kind, values, tile(shifted, reps), mask.to(device))
            prefix = runs.run.restrict(above[0], start)
            logits = run_from(
                model,
                tile(x_clean[above[0]][:, start:end], reps),
                above[0],
                prefix.keys,
                prefix.values,
                hooks,
                read_at=tile(last - start, reps),
            )
        logits = logits.view(reps, n, -1)
        for r, (layer, head) in enumerate(group):
            out[layer, head] = metric_total(metric, logits[r], clean)
    return out, clean_value


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True, eq=False)
class PathPatching:
    """One path-patching sweep: `scores[layer, head]` of every sender head at `sender_position`
    (NaN: not a sender; CPU, float32), through `receivers` (none: the direct effect on the
    metric), with the metric's name, whether scores are relative to the clean value, the method
    and the number of prompts. Negative scores: the patch lowers the metric."""

    scores: Float[Tensor, "layer head"]
    sender_position: Spec
    receivers: tuple[Receiver, ...] = ()
    metric: str = "answer_prob"
    relative: bool = True
    method: str = "fast"
    n: int = 0

    def top(self, k: int, *, among: Sequence[Head] | None = None) -> list[Head]:
        """The `k` heads with the most negative scores (`top_heads`)."""
        return top_heads(self.scores, k, among=among)

    def to_frame(self):
        """One row per sender: layer, head, score (most negative first)."""
        rows = [
            {"layer": layer, "head": head, "score": float(self.scores[layer, head])}
            for layer, head in self.top(self.scores.numel())
        ]
        return serial.frame(rows, ["layer", "head", "score"])

    def to_json(self) -> dict:
        return {
            "sender_position": serial.spec_to_json(self.sender_position),
            "receivers": serial.receivers_to_json(self.receivers),
            "metric": self.metric,
            "relative": self.relative,
            "method": self.method,
            "n": self.n,
            "scores": serial.table_to_json(self.scores),
        }

    @classmethod
    def from_json(cls, d: dict) -> PathPatching:
        return cls(
            serial.table_from_json(d["scores"]),
            serial.spec_from_json(d["sender_position"]),
            serial.receivers_from_json(d["receivers"]),
            d["metric"],
            d["relative"],
            d["method"],
            d["n"],
        )

    def __repr__(self) -> str:
        senders = int((~self.scores.isnan()).sum())
        through = ""
        if self.receivers:
            kinds = "".join(sorted({r.kind for r in self.receivers}))
            where = spec_text(sorted({spec_text(r.position) for r in self.receivers}))
            through = f", through {len(self.receivers)} {kinds} inputs at {where}"
        top = ", ".join(f"{serial.head_text(h)} {serial.number(float(self.scores[h]))}" for h in self.top(3))
        kind = "relative " if self.relative else ""
        return (
            f"PathPatching(at {spec_text(self.sender_position)}, {senders} senders{through}; "
            f"{kind}{self.metric}, n={self.n}; top: {top or 'none'})"
        )


def path_patch(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    sender_position: Spec,
    *,
    receivers: Sequence[Receiver] | None = None,
    metric: Metric | None = None,
    relative: bool | None = None,
    senders: Sequence[Head] | None = None,
    method: str = "fast",
    settings: RunSettings = QUIET,
    runs: PreparedRuns | None = None,
    ig_steps: int = 1,
) -> PathPatching:
    """Path-patching score of every sender head at `sender_position` (all heads unless
    `senders` is given; the others are NaN), as a `PathPatching` (see the module docstring).

    `receivers`: None for the direct effect on the metric, else (layer, head, "q"|"k"|"v",
    position) inputs the effect is measured through. `metric(logits_at_last, prompts)`, a mean
    over prompts (default `metrics.answer_prob`); a sender's score is metric(patched) -
    metric(clean), divided by metric(clean) if `relative` (default: True for the default
    metric, False for one passed in). `method`: "fast" (default) or "reference" (two full
    forwards per sender; the same scores) or "attribution" (the first-order estimate of every
    score, `ig_steps` gradient points; `attribution`). `runs`: the fast method's and the
    estimate's clean and corrupt runs (`prepare_runs`; made here if not given: pass them to
    share them between calls).
    """
    if method not in METHODS:
        raise CircuitError(f"unknown path-patching method {method!r}; expected one of {METHODS}")
    relative = (metric is None) if relative is None else relative
    metric = answer_prob if metric is None else metric
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sites = Sites.of(receivers or [], n_layers, n_heads)
    clean.check_pair(corrupt)  # corrupt values are read at the clean prompts' positions
    clean.check_vocab(model.cfg.d_vocab), corrupt.check_vocab(model.cfg.d_vocab)
    for spec in [sender_position, *(spec for _, spec in sites.masks)]:
        clean.position_set(spec)  # a clear error for an unknown position
    _warn_if_unreachable(clean, sender_position, [spec for _, spec in sites.masks])
    sender_mask = (
        torch.ones(n_layers, n_heads, dtype=torch.bool) if senders is None else head_mask(senders, n_layers, n_heads)
    )
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)  # sum over chunks of n x metric
    total_clean = 0.0
    device = model.cfg.device
    desc = f"path patching at {sender_position} ({method})"
    with per_head_values(model):
        if method == "reference":
            chunks = list(zip(clean.chunks(settings.batch_size), corrupt.chunks(settings.batch_size)))
            for c, k in tqdm(chunks, desc=desc, disable=not settings.progress, leave=False):
                change, clean_value = _reference_chunk(
                    model, c.to(device), k.to(device), sender_position, sites, sender_mask, metric
                )
                total += change
                total_clean += clean_value
        else:
            needed = [sender_position, *(spec for _, spec in sites.masks)]
            runs = runs if runs is not None else prepare_runs(model, clean, corrupt, needed, settings)
            missing = [spec for spec in needed if spec not in runs.positions]
            if len(runs) != len(clean) or missing:
                raise CircuitError(f"the prepared runs do not cover these prompts at {', '.join(missing) or 'all'}")
            if method == ESTIMATE:
                total, total_clean = attribution_total(
                    model, runs, clean, sender_position, sites, sender_mask, metric, ig_steps, settings.batch_size
                )
            else:
                sender_batch = max(1, min(int(sender_mask.sum(1).max()), settings.max_rows))
                at = clean.position_set(sender_position)
                chunks = same_start_chunks(earliest(at), max(1, settings.max_rows // sender_batch))
                for index in tqdm(chunks, desc=desc, disable=not settings.progress, leave=False):
                    change, clean_value = _fast_chunk(
                        model,
                        runs.take(index, model, needed),
                        clean[index].to(device),
                        sender_position,
                        sites,
                        sender_mask,
                        sender_batch,
                        metric,
                    )
                    total += change
                    total_clean += clean_value
                total = combine_nan(total)  # every rank's senders, to every rank
                if sites.masks:  # senders at or above every receiver's layer are unchanged: score 0
                    top = sites.layers[-1]
                    total[top:][sender_mask[top:]] = total_clean
    scores = (attribution_scores if method == ESTIMATE else score_of)(total, total_clean, len(clean), relative)
    return PathPatching(
        scores,
        sender_position,
        tuple(Receiver(*r) for r in receivers or ()),
        metric_name(metric),
        relative,
        method,
        len(clean),
    )


def _warn_if_unreachable(prompts: PromptSet, sender_position: Spec, receiver_positions: list[Spec]) -> None:
    """Warn when no sender slot of any prompt comes at or before what it should reach (the last
    token, or some receiver): causal attention then leaves every score 0."""
    at = prompts.position_set(sender_position)
    first = torch.where(at >= 0, at, torch.full_like(at, torch.iinfo(at.dtype).max)).min(1).values
    targets = (
        [prompts.position(LAST)[:, None]]
        if not receiver_positions
        else [prompts.position_set(spec) for spec in receiver_positions]
    )
    reach = torch.cat(targets, dim=1).max(1).values  # the latest position a sender could still affect
    if bool((first > reach).all()):
        what = "every receiver" if receiver_positions else "the last token"
        warnings.warn(
            f"senders at {spec_text(sender_position)} come after {what} in every prompt, so every score is 0",
            stacklevel=3,
        )


def top_heads(
    scores: PathPatching | Float[Tensor, "layer head"], k: int, *, among: Sequence[Head] | None = None
) -> list[Head]:
    """The `k` heads with the most negative scores (ties: lower layer, then lower head), only
    from `among` if given; heads scored NaN (not senders) are never chosen, so there may be fewer."""
    if isinstance(scores, PathPatching):
        scores = scores.scores
    if k < 0:
        raise CircuitError(f"top-k needs a number of heads >= 0, got {k}")
    n_heads = scores.shape[1]
    flat = scores.flatten()
    if among is not None:
        allowed = torch.zeros_like(flat, dtype=torch.bool)
        for layer, head in among:
            allowed[layer * n_heads + head] = True
        flat = torch.where(allowed, flat, torch.full_like(flat, float("nan")))
    order = [i for i in torch.sort(flat, stable=True).indices.tolist() if not flat[i].isnan()][:k]
    return [(i // n_heads, i % n_heads) for i in order]
