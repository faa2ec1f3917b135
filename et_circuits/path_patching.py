"""Path patching (Wang et al. 2023): how much each sender head's output at a position matters,
directly or through chosen receivers, and `find_circuit`, which chains such sweeps into
circuit discovery (the paper's four steps are `PAPER_STEPS`).

A sender head S is scored at a sender position P (a position spec; a position set patches S at
every position of the set). In the *frozen run* (clean prompt) every head at every position is
frozen to its clean `hook_z`, except S at P, which takes its value from the paired corrupt
prompt; MLPs stay free. Without receivers the metric reads the frozen run's logits at the last
position (the direct effect). With receivers, each receiver's input (`hook_q` / `hook_k` /
`hook_v`, before rotary) at its position is recorded from the frozen run and patched into a
fresh clean run (the *receiver run*), whose last position the metric reads.
score = metric(patched) - metric(clean), divided by metric(clean) when `relative`.

The default metric is the project's score for the paper: the relative change of the mean answer
probability, (mean p_patched - mean p_clean) / mean p_clean. The paper averages the per-prompt
ratio instead; that is unbounded (a prompt the model gets wrong with p_clean ~ 1e-6 adds a ratio
of thousands and decides the ranking alone) and equals ours wherever p_clean is the same
across prompts.

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
    once for every step (`prepare`), each corrupt run from its first changed token.
  So a step whose receivers sit at the last token (the paper's step B) recomputes one token per
  sender row; step C three (query label to last); step D, whose senders sit at the previous
  query label, every position from there to the last for each sender below the receivers.
  Both passes are `resume.run_from` (the frozen run with an empty prefix), which moves the
  residual stream and each layer's cache to that layer's device in a model split over GPUs.

With grouped-query attention, `hook_k` / `hook_v` are made per query head for the duration
(TransformerLens' `ungroup_grouped_query_attention`), so a receiver's input is its own.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .circuit import Circuit, head_mask
from .distributed import combine_nan, mine
from .errors import CircuitError
from .hooks import at_positions, gather, hook_name, logits_at, override_hooks, patch_hooks, store_hooks
from .metrics import Metric, answer_prob, metric_total, score_of
from .prompts import LAST, PromptSet, Spec
from .resume import (
    CleanRun, check_supported, earliest, embed, on_layers, output_device, run_from, same_start_chunks, tile,
)
from .settings import QUIET, RunSettings
from .types import INPUT_KINDS, PAPER_GROUPS, Head, Receiver

METHODS = ("fast", "reference")
TOP_K_CAP = 0.25  # at most this fraction of all heads per step (matters only for small models)


@contextmanager
def per_head_values(model: HookedTransformer):
    """Make `hook_k` / `hook_v` per query head while inside (a no-op without GQA)."""
    grouped = model.cfg.n_key_value_heads is not None and not model.cfg.ungroup_grouped_query_attention
    if grouped:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        if grouped:
            model.set_ungroup_grouped_query_attention(False)


@dataclass(frozen=True)
class _Sites:
    """Receivers grouped by (input kind, position spec): which heads receive there."""

    masks: dict[tuple[str, str], Bool[Tensor, "layer head"]]

    @classmethod
    def of(cls, receivers: Sequence[Receiver], n_layers: int, n_heads: int) -> "_Sites":
        by_site: dict[tuple[str, str], list[Head]] = {}
        for r in receivers:
            r = Receiver(*r)
            if r.kind not in INPUT_KINDS:
                raise CircuitError(f"receiver input {r.kind!r} is not one of {', '.join(INPUT_KINDS)}")
            by_site.setdefault((r.kind, r.position), []).append((int(r.layer), int(r.head)))
        return cls({site: head_mask(heads, n_layers, n_heads) for site, heads in by_site.items()})

    @property
    def layers(self) -> list[int]:
        """Every receiver layer, ascending."""
        return sorted({int(l) for m in self.masks.values() for l in m.any(1).nonzero()[:, 0].tolist()})


# ---------------------------------------------------------------------------------------------
# Reference: two full forward passes per sender


@torch.no_grad()
def _reference_chunk(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    sender_position: str,
    sites: _Sites,
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


@dataclass
class PreparedRuns:
    """What the fast method starts from, made once for every step (`prepare`): the clean run
    (every layer's `resid_pre`, keys and values at all positions), the clean logits at the last
    position, every head's clean `hook_z`, `hook_q`, `hook_k`, `hook_v` (`clean_at[kind]`) and
    corrupt `hook_z` at each prepared position.

    Kept in host memory (at 7B geometry and 300 prompts ~13 GB in bf16, as much as the model):
    each chunk of prompts moves to the model's device when a step reaches it."""

    run: CleanRun
    last_logits: Float[Tensor, "batch vocab"]
    clean_at: dict[str, dict[str, dict[int, Float[Tensor, "batch k head d_head"]]]]
    corrupt_z: dict[str, dict[int, Float[Tensor, "batch k head d_head"]]]

    def __len__(self) -> int:
        return self.last_logits.shape[0]

    def take(
        self, index: Int[Tensor, " n"], model: HookedTransformer, positions: Sequence[str] | None = None
    ) -> "PreparedRuns":
        """The rows of some prompts, each layer's on its device in `model`; only the
        activations at `positions` (default all prepared positions)."""
        index = index.to(self.last_logits.device)
        keep = set(self.positions if positions is None else positions)
        pick = partial(on_layers, model, index=index)
        return PreparedRuns(
            self.run.take(index, model),
            self.last_logits[index].to(output_device(model)),
            {kind: {p: pick(acts) for p, acts in by_spec.items() if p in keep} for kind, by_spec in self.clean_at.items()},
            {p: pick(zs) for p, zs in self.corrupt_z.items() if p in keep},
        )

    @property
    def positions(self) -> list[str]:
        return list(self.corrupt_z)


@torch.no_grad()
def prepare(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    positions: Sequence[str],
    settings: RunSettings = QUIET,
) -> PreparedRuns:
    """Run the clean prompts once and keep what the fast method needs for senders and receivers
    at each of `positions`; then run each corrupt prompt from its first changed token only, attending to
    the clean prefix's keys and values (a corruption that starts mid-prompt leaves the rest of
    the corrupt prompt equal to its clean one)."""
    check_supported(model)
    positions = list(dict.fromkeys(positions))
    clean.check_pair(corrupt)
    n_layers, device = model.cfg.n_layers, model.cfg.device
    layers = range(n_layers)
    kinds = ("z", *INPUT_KINDS)
    kept = {f"blocks.{layer}.hook_resid_pre" for layer in layers}
    kept |= {hook_name(k, layer) for k in kinds for layer in layers}
    z_names = {hook_name("z", layer) for layer in layers}
    runs: list[CleanRun] = []
    last_logits = []
    clean_at = {kind: {p: {layer: [] for layer in layers} for p in positions} for kind in kinds}
    with per_head_values(model):
        parts = list(clean.chunks(settings.batch_size))
        for c in tqdm(parts, desc="path patching: clean runs", disable=not settings.progress, leave=False):
            c = c.to(device)
            logits, cache = model.run_with_cache(c.input_ids, names_filter=lambda n: n in kept)
            runs.append(CleanRun(
                {layer: cache[f"blocks.{layer}.hook_resid_pre"].cpu() for layer in layers},
                {layer: cache[hook_name("k", layer)].cpu() for layer in layers},
                {layer: cache[hook_name("v", layer)].cpu() for layer in layers},
            ))
            last_logits.append(logits_at(logits, c.position(LAST)).cpu())
            for kind in kinds:
                for p in positions:
                    for layer in layers:
                        act = at_positions(cache[hook_name(kind, layer)], c.position_set(p))
                        clean_at[kind][p][layer].append(act.cpu())
            del cache, logits
        clean_at = {
            kind: {p: {layer: torch.cat(acts) for layer, acts in by_layer.items()} for p, by_layer in by_spec.items()}
            for kind, by_spec in clean_at.items()
        }
        corrupt_z = {p: {layer: torch.empty_like(z) for layer, z in zs.items()} for p, zs in clean_at["z"].items()}
        prepared = PreparedRuns(CleanRun.concat(runs), torch.cat(last_logits), clean_at, corrupt_z)
        del runs
        start = _first_change(clean, corrupt, positions)
        parts = same_start_chunks(start, settings.batch_size)
        for index in tqdm(parts, desc="path patching: corrupt runs", disable=not settings.progress, leave=False):
            s = int(start[index[0]])
            keys, values = ({l: run[l][index, :s] for l in layers} for run in (prepared.run.keys, prepared.run.values))
            x = embed(model, corrupt.input_ids[index, s:].to(device), s)
            cache: dict[str, Tensor] = {}
            hooks = [(name, partial(_keep, store=cache)) for name in sorted(z_names)]
            run_from(model, x, 0, keys, values, hooks)
            for p in positions:
                at = clean[index].position_set(p)
                at = torch.where(at >= 0, at - s, at)
                for layer in layers:
                    prepared.corrupt_z[p][layer][index] = at_positions(cache[hook_name("z", layer)], at).cpu()
            del cache
    return prepared


def _keep(act, hook, store):
    store[hook.name] = act.detach()


def _first_change(clean: PromptSet, corrupt: PromptSet, positions: Sequence[str]) -> Int[Tensor, " batch"]:
    """Where each corrupt run starts: its first token that differs from the clean prompt, or
    the earliest sender position if that comes first (corrupt heads are read there)."""
    differs = clean.input_ids != corrupt.input_ids.to(clean.device)
    first = torch.where(differs.any(1), differs.int().argmax(1), differs.shape[1])
    for p in positions:
        first = torch.minimum(first, earliest(clean.position_set(p)))
    return first


def _match(at: Int[Tensor, "n k"], where: Int[Tensor, "n m"]) -> Int[Tensor, "n m"]:
    """For each receiver slot, the sender slot at the same position (-1: none; the frozen run
    leaves the receiver's input there clean)."""
    same = (where[:, :, None] == at[:, None, :]) & (where[:, :, None] >= 0)  # n m k
    return torch.where(same.any(-1), same.int().argmax(-1), torch.full_like(where, -1))


@torch.no_grad()
def _fast_chunk(
    model: HookedTransformer,
    runs: PreparedRuns,
    clean: PromptSet,
    sender_position: str,
    sites: _Sites,
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
            slot = _match(at, last[:, None])[:, 0]  # where the last position is a sender position
            picked = logits_at(logits, tile(slot.clamp(min=0), reps))
            logits = torch.where(tile(slot >= 0, reps)[:, None].to(picked.device), picked, tile(runs.last_logits, reps).to(picked.dtype))
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
                slot = tile(_match(at, where), reps).view(reps, n, -1)
                values = {}
                for m, v in recorded[kind].items():
                    v, slot = v.view(reps, n, k, n_heads, -1), slot.to(v.device)
                    index = slot.clamp(min=0)[..., None, None]
                    frozen_in = torch.gather(v, 2, index.expand(-1, -1, -1, n_heads, v.shape[-1]))
                    clean_in = runs.clean_at[kind][spec][m][None].to(v.dtype)
                    values[m] = torch.where(slot[..., None, None] >= 0, frozen_in, clean_in).view(reps * n, -1, n_heads, v.shape[-1])
                shifted = torch.where(where >= 0, where - start, where)
                hooks += patch_hooks(kind, values, tile(shifted, reps), mask.to(device))
            prefix = runs.run.restrict(above[0], start)
            logits = run_from(
                model, tile(x_clean[above[0]][:, start:end], reps), above[0], prefix.keys, prefix.values, hooks,
                read_at=tile(last - start, reps),
            )
        logits = logits.view(reps, n, -1)
        for r, (layer, head) in enumerate(group):
            out[layer, head] = metric_total(metric, logits[r], clean)
    return out, clean_value


# ---------------------------------------------------------------------------------------------
# Public API


def path_patch(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    sender_position: str,
    receivers: Sequence[Receiver] | None = None,
    metric: Metric | None = None,
    relative: bool | None = None,
    senders: Sequence[Head] | None = None,
    method: str = "fast",
    settings: RunSettings = QUIET,
    runs: PreparedRuns | None = None,
) -> Float[Tensor, "layer head"]:
    """Path-patching score of every sender head at `sender_position` (all heads unless
    `senders` is given; the others are NaN), on CPU in float32.

    `receivers`: None for the direct effect on the metric, else (layer, head, "q"|"k"|"v",
    position) inputs the effect is measured through. `metric(logits_at_last, prompts)`, a mean
    over prompts (default `metrics.answer_prob`); a sender's score is metric(patched) -
    metric(clean), divided by metric(clean) if `relative` (default: True for the default
    metric, False for one passed in). `runs`: the fast method's clean and corrupt runs
    (`prepare`; made here if not given: pass them to share them between calls).
    """
    if method not in METHODS:
        raise CircuitError(f"unknown path-patching method {method!r}; expected one of {METHODS}")
    relative = (metric is None) if relative is None else relative
    metric = answer_prob if metric is None else metric
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sites = _Sites.of(receivers or [], n_layers, n_heads)
    clean.check_pair(corrupt)  # corrupt values are read at the clean prompts' positions
    for spec in [sender_position, *(spec for _, spec in sites.masks)]:
        clean.position_set(spec)  # a clear error for an unknown position
    sender_mask = torch.ones(n_layers, n_heads, dtype=torch.bool) if senders is None else head_mask(senders, n_layers, n_heads)
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
            runs = runs if runs is not None else prepare(model, clean, corrupt, needed, settings)
            missing = [spec for spec in needed if spec not in runs.positions]
            if len(runs) != len(clean) or missing:
                raise CircuitError(f"the prepared runs do not cover these prompts at {', '.join(missing) or 'all'}")
            sender_batch = max(1, min(int(sender_mask.sum(1).max()), settings.max_rows))
            at = clean.position_set(sender_position)
            chunks = same_start_chunks(earliest(at), max(1, settings.max_rows // sender_batch))
            for index in tqdm(chunks, desc=desc, disable=not settings.progress, leave=False):
                change, clean_value = _fast_chunk(
                    model, runs.take(index, model, needed), clean[index].to(device), sender_position, sites, sender_mask,
                    sender_batch, metric,
                )
                total += change
                total_clean += clean_value
            total = combine_nan(total)  # every rank's senders, to every rank
            if sites.masks:  # senders at or above every receiver's layer are unchanged: score 0
                top = sites.layers[-1]
                total[top:][sender_mask[top:]] = total_clean
    return score_of(total, total_clean, len(clean), relative)


def top_heads(scores: Float[Tensor, "layer head"], k: int, among: Sequence[Head] | None = None) -> list[Head]:
    """The `k` heads with the most negative scores (ties: lower layer, then lower head), only
    from `among` if given; heads scored NaN (not senders) are never chosen, so there may be fewer."""
    n_heads = scores.shape[1]
    flat = scores.flatten()
    if among is not None:
        allowed = torch.zeros_like(flat, dtype=torch.bool)
        for layer, head in among:
            allowed[layer * n_heads + head] = True
        flat = torch.where(allowed, flat, torch.full_like(flat, float("nan")))
    order = [i for i in torch.sort(flat, stable=True).indices.tolist() if not flat[i].isnan()][:k]
    return [(i // n_heads, i % n_heads) for i in order]


def reachable(receivers: Sequence[Receiver], n_layers: int, n_heads: int) -> list[Head]:
    """The senders that can reach a receiver at all: heads below its layer (a sender's output
    enters the residual stream after its own layer's attention). Without receivers, every head."""
    top = max((r.layer for r in receivers), default=n_layers)
    return [(l, h) for l in range(min(top, n_layers)) for h in range(n_heads)]


def effective_top_k(top_k: Sequence[int], n_layers: int, n_heads: int, cap: float = TOP_K_CAP) -> tuple[int, ...]:
    """`top_k` capped to `cap` of all heads (at least 1): the paper's 20/5/10/5 out of 1024 heads
    would take most of a 16-head model, so small models keep at most a quarter per step."""
    if any(k <= 0 for k in top_k):
        raise CircuitError(f"top-k needs positive numbers, got {list(top_k)}")
    if not 0 < cap <= 1:
        raise CircuitError(f"top-k cap must be in (0, 1], got {cap}")
    limit = max(1, int(cap * n_layers * n_heads))
    return tuple(min(k, limit) for k in top_k)


# ---------------------------------------------------------------------------------------------
# Circuit discovery: steps of path patching, each step's receivers the previous step's top heads


@dataclass(frozen=True)
class Step:
    """One discovery step: the group it finds, the sender position (a spec or a union of specs),
    and the input kinds ("q", "k", "v", or several: "kv") through which its senders are scored
    on the previous group's heads (None: on the metric)."""

    group: str
    position: Spec
    receiver_kind: str | None
    receivers_from: str | None = None  # the group whose heads receive (default: the step before's)


PAPER_STEPS: tuple[Step, ...] = tuple(Step(g.name, g.position, g.receiver_kind) for g in PAPER_GROUPS)
StepLookup = Callable[[Step, list[Receiver]], "Tensor | None"]
StepDone = Callable[[Step, list[Receiver], Tensor, bool, float], None]


def step_receivers(step: Step, previous: Sequence[Head]) -> list[Receiver]:
    """The previous group's heads, receiving through each input kind of `step.receiver_kind`
    ("q", "v", or several, e.g. "kv") at the step's position."""
    if step.receiver_kind is None:
        return []
    return [Receiver(layer, head, kind, step.position) for kind in step.receiver_kind for layer, head in previous]


def find_circuit(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    top_k: Sequence[int],
    steps: Sequence[Step] = PAPER_STEPS,
    metric: Metric | None = None,
    relative: bool | None = None,
    method: str = "fast",
    settings: RunSettings = QUIET,
    finished: StepLookup | None = None,
    on_step: StepDone | None = None,
) -> tuple[Circuit, dict[str, Float[Tensor, "layer head"]]]:
    """Path patching step after step; each step's receivers are the heads an earlier step found
    (the step before's, unless `Step.receivers_from` names another), through the step's input
    kinds at its position (`step_receivers`). A group is its step's `top_k` heads among those
    that can reach a receiver (`reachable`), so it may hold fewer, or none; a step whose
    receivers are none scores no sender. Returns the circuit (each group at its step's
    position) and every step's scores.

    `finished(step, receivers)` may return a step's earlier scores (the step is then not
    recomputed); `on_step(step, receivers, scores, reused, seconds)` is called after each step.
    """
    if len(top_k) != len(steps):
        raise CircuitError(f"top-k needs {len(steps)} numbers (one per step), got {list(top_k)}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores: dict[str, Tensor] = {}
    groups: dict[str, list[Head]] = {}
    runs = None  # the fast method's clean and corrupt runs, shared by the steps computed
    for i, (step, k) in enumerate(zip(steps, top_k)):
        source = step.receivers_from or (steps[i - 1].group if i else None)
        receivers = step_receivers(step, groups.get(source, []))
        if step.receiver_kind is not None and source not in groups:
            raise CircuitError(f"step {step.group} receives from {source!r}, which no earlier step found")
        t0 = time.perf_counter()
        found = finished(step, receivers) if finished is not None else None
        reused = found is not None
        if not reused:
            if method == "fast" and runs is None:
                runs = prepare(model, clean, corrupt, [s.position for s in steps], settings)
            senders = None if receivers or step.receiver_kind is None else []  # nothing to receive: no sender
            found = path_patch(
                model, clean, corrupt, step.position, receivers or None, metric, relative, senders, method,
                settings, runs,
            )
        scores[step.group] = found
        if on_step is not None:
            on_step(step, receivers, found, reused, time.perf_counter() - t0)
        groups[step.group] = top_heads(found, k, reachable(receivers, n_layers, n_heads))
    circuit = Circuit(groups, {s.group: s.position for s in steps})
    return circuit, scores
