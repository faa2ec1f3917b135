"""Attribution for path patching: the first-order estimate of every sender's exact score, all
senders at once, under the exact method's freeze semantics (`path_patching`'s module doc).

attribution(s) = sum over prompts and sender positions of dz_s . dS/dz_s, where dz_s is the
corrupt minus the clean `hook_z` of sender s at its positions and S is

- without receivers: the metric of the frozen run (every head's z frozen, MLPs and norms free);
- with receivers: sum_r g_r . x_r(z), x_r being receiver r's q/k/v input at its position in the
  frozen run and g_r = d metric / d x_r in the clean receiver run with *every* receiver input
  overwritten (so no gradient passes through another receiver's recomputed input).

This is the derivative of the exact score along dz (tested against central finite differences
of the exact method). Scores are in the exact method's units: the metric's change, divided by
its clean value when relative. `ig_steps` = N averages the gradient at the N points
clean + (i / N) dz, i = 0..N-1, every sender's output moving together (integrated gradients as
in EAP-IG; N = 1 is plain attribution at the clean run).

Cost per step and gradient point, from the shared clean and corrupt runs (`prepare_runs`): the
frozen run over the sender positions alone (forward and backward) and, with receivers, the
receiver run restarted from the lowest receiver layer and the earliest sender position (forward
and backward), one row per prompt, `settings.batch_size` prompts at a time.

An estimate, not a score: it can rank senders wrongly (nonlinear attention, saturated
softmax), so discovery verifies what it proposes with the exact method (`find_circuit(screen=)`).
"""

from __future__ import annotations

from functools import partial

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from et_circuits.core.errors import CircuitError
from et_circuits.core.hooks import Hook, at_positions, hook_name, override_hooks, patch_hooks
from et_circuits.core.prepared import PreparedRuns
from et_circuits.core.prompts import LAST, PromptSet, Spec
from et_circuits.core.restart import block_device, earliest, run_from
from et_circuits.core.sites import Sites, match_slots

ESTIMATE = "attribution"  # `path_patch(method=)`'s name for this estimate


def metric_sum(metric, logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, ""]:
    """n x the metric on a chunk, differentiable (the metric must return a tensor)."""
    value = metric(logits, prompts)
    if not isinstance(value, Tensor):
        raise CircuitError("attribution needs a metric that returns a tensor (to differentiate it)")
    return value.double().mean() * len(prompts)


def _record_hook(act, hook: HookPoint, store, layer):
    store[layer] = act  # kept in the autograd graph


def record_hooks(kind: str, layers, store: dict[int, Tensor]) -> list[Hook]:
    """Hooks that keep each layer's `kind` activation, its graph included (to differentiate it)."""
    return [(hook_name(kind, l), partial(_record_hook, store=store, layer=l)) for l in layers]


def _receiver_gradients(
    model: HookedTransformer,
    runs: PreparedRuns,
    clean: PromptSet,
    sites: Sites,
    inputs: dict[tuple[str, str], dict[int, Tensor]],
    start: int,
    metric,
) -> dict[tuple[str, str], dict[int, Tensor]]:
    """g_r: the gradient of n x the metric of the receiver run (every receiver input overwritten
    by `inputs`) with respect to those inputs. The run restarts at the lowest receiver layer and
    position `start`; receivers before `start` keep their clean input there (no sender reaches
    them)."""
    leaves = {site: {m: v.detach().requires_grad_() for m, v in by_layer.items()} for site, by_layer in inputs.items()}
    hooks = []
    for (kind, spec), mask in sites.masks.items():
        where = clean.position_set(spec)
        shifted = torch.where(where >= start, where - start, torch.full_like(where, -1))
        hooks += patch_hooks(kind, leaves[(kind, spec)], shifted, mask.to(where.device))
    bottom = sites.layers[0]
    last = clean.position(LAST)
    prefix = runs.run.restrict(bottom, start)
    x = runs.run.resid[bottom][:, start : int(last.max()) + 1]
    logits = run_from(model, x, bottom, prefix.keys, prefix.values, hooks, read_at=last - start)
    flat = [(site, m) for site, by_layer in leaves.items() for m in by_layer]
    grads = torch.autograd.grad(metric_sum(metric, logits, clean), [leaves[s][m] for s, m in flat], allow_unused=True)
    out: dict[tuple[str, str], dict[int, Tensor]] = {site: {} for site in leaves}
    for (site, m), g in zip(flat, grads):
        out[site][m] = torch.zeros_like(leaves[site][m]) if g is None else g
    return out


def chunk_attribution(
    model: HookedTransformer,
    runs: PreparedRuns,
    clean: PromptSet,
    sender_position: Spec,
    sites: Sites,
    senders: Bool[Tensor, "layer head"],
    metric,
    ig_steps: int,
) -> Float[Tensor, "layer head"]:
    """sum over this chunk's prompts and sender positions of dz . dS/dz for every head (float64,
    CPU; the units of n x the metric), averaged over the `ig_steps` gradient points."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_kv, d_head = model.cfg.n_key_value_heads or n_heads, model.cfg.d_head
    at: Int[Tensor, "n k"] = clean.position_set(sender_position)
    out = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    rows = senders.any(1).nonzero()[:, 0].tolist()
    if not rows:
        return out
    first = rows[0]
    stop = n_layers if not sites.masks else sites.layers[-1] + 1
    if first >= stop - (1 if sites.masks else 0):
        return out  # no sender below a receiver's layer
    clean_z, corrupt_z = runs.clean_at["z"][sender_position], runs.corrupt_z[sender_position]
    delta = {}
    for m in range(first, stop):
        keep = (at >= 0)[:, :, None, None].to(clean_z[m].device) & senders[m][None, None, :, None].to(clean_z[m].device)
        delta[m] = torch.where(keep, corrupt_z[m] - clean_z[m], torch.zeros_like(clean_z[m]))
    x = at_positions(runs.run.resid[first], at)  # the sender positions as a sequence of their own
    alone = {m: x.new_zeros(1, 0, n_kv, d_head) for m in range(first, stop)}
    last = clean.position(LAST)
    for i in range(ig_steps):
        alpha = i / ig_steps
        z = {m: (clean_z[m] + alpha * delta[m]).detach().requires_grad_() for m in range(first, stop)}
        if not sites.masks:
            slot = match_slots(at, last[:, None])[:, 0]  # where the last position is a sender position
            logits = run_from(model, x, first, alone, alone, override_hooks("z", z), read_at=slot.clamp(min=0))
            reached = (slot >= 0)[:, None].to(logits.device)
            logits = torch.where(reached, logits, runs.last_logits.to(logits.device, logits.dtype))
            target = metric_sum(metric, logits, clean)
        else:
            recorded: dict[str, dict[int, Tensor]] = {kind: {} for kind, _ in sites.masks}
            layers = [m for m in sites.layers if m > first]
            hooks = [h for kind in recorded for h in record_hooks(kind, layers, recorded[kind])]
            run_from(model, x, first, alone, alone, [*override_hooks("z", z), *hooks], stop_at_layer=stop)
            inputs = {}
            for (kind, spec), mask in sites.masks.items():
                where = clean.position_set(spec)
                slot = match_slots(at, where)  # n m
                inputs[(kind, spec)] = {}
                for m in mask.any(1).nonzero()[:, 0].tolist():
                    clean_in = runs.clean_at[kind][spec][m]
                    if m not in recorded[kind]:
                        inputs[(kind, spec)][m] = clean_in
                        continue
                    v, s = recorded[kind][m], slot.to(clean_in.device)
                    index = s.clamp(min=0)[:, :, None, None].expand(-1, -1, *v.shape[2:])
                    frozen_in = torch.gather(v, 1, index)
                    inputs[(kind, spec)][m] = torch.where(s[:, :, None, None] >= 0, frozen_in, clean_in.to(v.dtype))
            start = int(earliest(at).min())
            g = _receiver_gradients(model, runs, clean, sites, inputs, start, metric)
            target = sum(
                (g[site][m].to(v.dtype) * v).double().sum()
                for site, by_layer in inputs.items()
                for m, v in by_layer.items()
                if v.requires_grad
            )
            if not isinstance(target, Tensor):
                continue  # no receiver input depends on a sender
        grads = torch.autograd.grad(target, [z[m] for m in range(first, stop)], allow_unused=True)
        for m, grad in zip(range(first, stop), grads):
            if grad is not None:
                out[m] += (delta[m].double() * grad.double()).sum((0, 1, 3)).cpu() / ig_steps
    return out


def attribution_total(
    model: HookedTransformer,
    runs: PreparedRuns,
    clean: PromptSet,
    sender_position: Spec,
    sites: Sites,
    senders: Bool[Tensor, "layer head"],
    metric,
    ig_steps: int,
    batch_size: int,
) -> tuple[Float[Tensor, "layer head"], float]:
    """The attribution of every head summed over all prompts (n x the metric's units; NaN for
    non-senders) and n x the clean metric, chunk by chunk of `batch_size` prompts."""
    if ig_steps < 1:
        raise CircuitError(f"ig_steps must be >= 1, got {ig_steps}")
    positions = [sender_position, *(spec for _, spec in sites.masks)]
    total = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
    total_clean = 0.0
    device = block_device(model, 0)
    with torch.enable_grad():
        for index in torch.arange(len(clean)).split(batch_size):
            part = runs.take(index, model, positions)
            prompts = clean[index].to(device)
            total += chunk_attribution(model, part, prompts, sender_position, sites, senders, metric, ig_steps)
            with torch.no_grad():
                total_clean += float(metric_sum(metric, part.last_logits, prompts))
    total[~senders] = float("nan")
    return total, total_clean


def attribution_scores(total: Tensor, total_clean: float, n: int, relative: bool) -> Float[Tensor, "layer head"]:
    """Scores in the exact method's units from `attribution_total`: the mean change per prompt,
    divided by the clean metric when `relative` (float32)."""
    scores = total / n
    if relative:
        clean_value = total_clean / n
        if clean_value == 0:
            raise CircuitError("the metric is 0 on the clean prompts: a relative score is undefined")
        scores = scores / clean_value
    return scores.float()


# ---------------------------------------------------------------------------------------------
# The position sweep's estimate: activation patching of every (position, layer, head) to first order


def sweep_attribution(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    positions: list[Spec],
    metric,
    batch_size: int,
) -> tuple[Float[Tensor, "position layer head"], float]:
    """sum over prompts of dz . d metric / dz at each position of `positions` for every head
    (z: `hook_z` of the clean run, dz: corrupt minus clean there; a position set sums its
    positions), in n x the metric's units, and n x the clean metric. Per chunk of `batch_size`
    prompts: one clean forward and backward, and one corrupt forward."""
    n_layers = model.cfg.n_layers
    layers = range(n_layers)
    total = torch.zeros(len(positions), n_layers, model.cfg.n_heads, dtype=torch.float64)
    total_clean = 0.0
    device = block_device(model, 0)
    for c, k in zip(clean.chunks(batch_size), corrupt.chunks(batch_size)):
        c, k = c.to(device), k.to(device)
        with torch.no_grad():
            corrupt_z: dict[int, Tensor] = {}
            model.run_with_hooks(k.input_ids, fwd_hooks=record_hooks("z", layers, corrupt_z))
        with torch.enable_grad():
            clean_z: dict[int, Tensor] = {}
            logits = model.run_with_hooks(c.input_ids, fwd_hooks=record_hooks("z", layers, clean_z))
            last = logits[torch.arange(len(c), device=logits.device), c.position(LAST).to(logits.device)]
            value = metric_sum(metric, last, c)
            grads = torch.autograd.grad(value, [clean_z[l] for l in layers])
        total_clean += float(value.detach())
        for i, spec in enumerate(positions):
            at = c.position_set(spec)
            for l in layers:
                delta = at_positions(corrupt_z[l], at) - at_positions(clean_z[l].detach(), at)  # n k head d
                delta = torch.where((at >= 0)[:, :, None, None].to(delta.device), delta, torch.zeros_like(delta))
                total[i, l] += (delta.double() * at_positions(grads[l], at).double()).sum((0, 1, 3)).cpu()
    return total, total_clean
