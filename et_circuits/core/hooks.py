"""Per-head activation hooks at per-example positions: the one home of reading and overwriting
`hook_z` / `hook_q` / `hook_k` / `hook_v` / `hook_result` that path patching, circuit
evaluation, DCM, CMAP and knockout all call.

Activations of these hook points have shape [batch, pos, head, d]; a position is given per
example (`Int[Tensor, "batch"]`) because it differs between prompts, or as a position set per
example (`Int[Tensor, "batch k"]`, -1 where an example has fewer), e.g. every segment's label.
Also here: the hooks that keep whole activations (`keep_hooks`), that block attention edges
(`block_hooks`), and every hook point's name (`hook_name`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from contextlib import contextmanager
from functools import partial

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from .errors import DataError, SetupError

HEAD_KINDS = ("z", "q", "k", "v", "result")  # per-head activations: [batch, pos, head, d]
ATTENTION_KINDS = (*HEAD_KINDS, "attn_scores")  # hook points of a block's attention
BLOCK_KINDS = ("resid_pre",)  # hook points of the block itself
Hook = tuple[str, Callable]
Positions = Int[Tensor, " batch"] | Int[Tensor, "batch k"]  # one position per example, or a set (-1: none)


def hook_name(kind: str, layer: int) -> str:
    """The name of a hook point of block `layer`: `blocks.{layer}.attn.hook_{kind}` for an
    attention activation (ATTENTION_KINDS), `blocks.{layer}.hook_{kind}` for BLOCK_KINDS."""
    if kind in ATTENTION_KINDS:
        return f"blocks.{layer}.attn.hook_{kind}"
    if kind in BLOCK_KINDS:
        return f"blocks.{layer}.hook_{kind}"
    raise SetupError(f"unknown activation {kind!r}; expected one of {ATTENTION_KINDS + BLOCK_KINDS}")


@contextmanager
def per_head_values(model: HookedTransformer):
    """Make `hook_k` / `hook_v` per query head while inside (TransformerLens'
    `ungroup_grouped_query_attention`; a no-op without grouped-query attention), so that a
    query head's key or value input is its own."""
    grouped = model.cfg.n_key_value_heads is not None and not model.cfg.ungroup_grouped_query_attention
    if grouped:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        if grouped:
            model.set_ungroup_grouped_query_attention(False)


def require_flags(model: HookedTransformer, kind: str) -> None:
    """Methods on `hook_result` need `use_attn_result`; say so instead of failing later."""
    if kind == "result" and not model.cfg.use_attn_result:
        raise SetupError("hook_result needs model.set_use_attn_result(True)")


def filled_slots(positions: Positions, device) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """(row, slot, position) of every slot that has a position (>= 0; a single position per
    row is slot 0), on `device`. Found where `positions` are: on the host they need no sync
    with a GPU, and a model split over GPUs reads them on each layer's device."""
    at = positions[:, None] if positions.ndim == 1 else positions
    rows, slots = (at >= 0).nonzero(as_tuple=True)
    return rows.to(device), slots.to(device), at[rows, slots].to(device)


def at_positions(
    act: Float[Tensor, "batch pos head d"], positions: Positions
) -> Float[Tensor, "batch head d"] | Float[Tensor, "batch k head d"]:
    """act[b, positions[b]] for every example b (or act[b, positions[b, j]] for every slot j of
    a position set; slots without a position (-1) read position 0)."""
    positions = positions.to(act.device)
    at = positions[:, None] if positions.ndim == 1 else positions
    rows = torch.arange(at.shape[0], device=act.device)[:, None].expand_as(at)
    out = act[rows, at.clamp(min=0)]
    return out[:, 0] if positions.ndim == 1 else out


def mix_at_positions(
    act: Float[Tensor, "batch pos head d"],
    positions: Positions,
    new: Float[Tensor, "batch head d"] | Float[Tensor, "batch k head d"],
    weight: Float[Tensor, " head"] | Float[Tensor, "batch head"],
) -> Float[Tensor, "batch pos head d"]:
    """At each example's position (or each position of its set), head h becomes
    (1 - weight[h]) * act + weight[h] * new (weight[b, h] for a weight per example).

    weight 1 overwrites a head, 0 leaves it; fractional weights interpolate (DCM's mask; one
    per example when several masks train in one batch). Out of place, so gradients flow to
    `weight`.
    """
    rows, slots, at = filled_slots(positions, act.device)
    new = new.to(act.device, act.dtype)
    new = (new[:, None] if positions.ndim == 1 else new)[rows, slots]
    old = act[rows, at]
    weight = weight.to(act.device, act.dtype)
    w = (weight[None] if weight.ndim == 1 else weight[rows])[:, :, None]
    act = act.clone()
    act[rows, at] = old + w * (new - old)
    return act


def _mix_hook(act, hook: HookPoint, positions, new, weight):
    return mix_at_positions(act, positions, new, weight)


def patch_hooks(
    kind: str,
    new: dict[int, Float[Tensor, "batch head d"]] | dict[int, Float[Tensor, "batch k head d"]],
    positions: Positions,
    weights: Float[Tensor, "layer head"] | Bool[Tensor, "layer head"] | Float[Tensor, "layer batch head"],
) -> list[Hook]:
    """Hooks that write `new[layer]` into the heads selected by `weights[layer]` (per example
    where it has a batch axis) at `positions`; boolean layers all False get no hook."""
    hooks = []
    for layer, values in new.items():
        w = weights[layer].float() if weights.dtype == torch.bool else weights[layer]
        if weights.dtype == torch.bool and not weights[layer].any():
            continue
        hooks.append((hook_name(kind, layer), partial(_mix_hook, positions=positions, new=values, weight=w)))
    return hooks


def _store_hook(act, hook: HookPoint, positions, store, layer):
    store[layer] = at_positions(act, positions).detach()


def store_hooks(kind: str, positions: Positions, layers: Iterable[int], store: dict[int, Tensor]) -> list[Hook]:
    """Hooks that put each layer's `kind` activation at `positions` into `store[layer]`, so
    several kinds and positions can be read in one forward pass (CMAP's source run)."""
    return [
        (hook_name(kind, layer), partial(_store_hook, positions=positions, store=store, layer=layer))
        for layer in layers
    ]


def _keep_hook(act, hook: HookPoint, store, key):
    store[key] = act.detach()


def keep_hooks(kind: str, layers: Iterable[int], store: MutableMapping[int, Tensor]) -> list[Hook]:
    """Hooks that put each layer's whole `kind` activation into `store[layer]`."""
    return [(hook_name(kind, layer), partial(_keep_hook, store=store, key=layer)) for layer in layers]


def _rows_hook(act, hook: HookPoint, slots, values):
    rows, slot, at = filled_slots(slots, act.device)
    act = act.clone()
    act[act.shape[0] - slots.shape[0] + rows, at] = values.to(act.device)[rows, slot].to(act.dtype)
    return act


def last_rows_hook(kind: str, layer: int, slots: Int[Tensor, "rows k"], values: Float[Tensor, "rows k head d"]) -> Hook:
    """A hook writing `values` at each row's slot positions into the *last* `len(slots)` rows
    of the batch (rows that joined a restarted pass at this layer, see `restart.run_from`)."""
    return hook_name(kind, layer), partial(_rows_hook, slots=slots, values=values)


def _block_hook(scores, hook: HookPoint, queries, keys):
    rows = torch.arange(scores.shape[0], device=scores.device)
    scores = scores.clone()
    scores[rows, :, queries.to(scores.device), keys.to(scores.device)] = float("-inf")
    return scores


def block_hooks(
    queries: Int[Tensor, " batch"], keys: Int[Tensor, " batch"], layers: Iterable[int], start: int = 0
) -> list[Hook]:
    """Hooks stopping every head of `layers` from attending from queries[b] to keys[b]: the
    pre-softmax score becomes -inf (`hook_attn_scores`, after the causal mask), so the other
    keys share the attention the blocked one had.

    `start`: the first query position the run computes (a restarted suffix run), so the query
    axis is shifted by it while the key axis keeps full positions.
    """
    if (keys >= queries).any():
        raise DataError("a blocked key must come before its query (causal attention)")
    if (queries < start).any():
        raise DataError(f"a blocked query lies before the run's first position {start}")
    hook = partial(_block_hook, queries=queries - start, keys=keys)
    return [(hook_name("attn_scores", layer), hook) for layer in layers]


@torch.no_grad()
def gather(
    model: HookedTransformer,
    input_ids: Int[Tensor, "batch seq"],
    kind: str,
    positions: Positions,
    layers: Iterable[int] | None = None,
    fwd_hooks: list[Hook] = (),
) -> dict[int, Float[Tensor, "batch head d"]]:
    """Run `model` (with optional extra hooks) and return each layer's `kind` activation at
    `positions`, without caching anything else."""
    require_flags(model, kind)
    layers = list(range(model.cfg.n_layers) if layers is None else layers)
    store: dict[int, Tensor] = {}
    hooks = store_hooks(kind, positions, layers, store)
    model.run_with_hooks(input_ids.to(model.cfg.device), fwd_hooks=[*fwd_hooks, *hooks], stop_at_layer=max(layers) + 1)
    return store


def _replace_hook(act, hook: HookPoint, replacement, keep):
    return torch.where(keep[..., None].to(act.device), act, replacement.to(act.device, act.dtype))


def replace_hooks(
    kind: str,
    replacement: Float[Tensor, "layer pos head d"],
    keep: Bool[Tensor, "layer batch pos head"],
) -> list[Hook]:
    """Hooks that replace every head activation by `replacement` (e.g. a position-wise mean)
    except where `keep` is true. Used for mean ablation."""
    seq = keep.shape[2]
    return [
        (hook_name(kind, layer), partial(_replace_hook, replacement=replacement[layer, :seq], keep=keep[layer]))
        for layer in range(replacement.shape[0])
    ]


@torch.no_grad()
def mean_activations(
    model: HookedTransformer,
    input_ids: Int[Tensor, "batch seq"],
    kind: str = "z",
    batch_size: int = 32,
) -> Float[Tensor, "layer pos head d"]:
    """Position-wise mean of every head's `kind` activation over `input_ids` (on the model's
    first device, also when its layers are split over several)."""
    require_flags(model, kind)
    total = None
    names = [hook_name(kind, layer) for layer in range(model.cfg.n_layers)]
    for chunk in input_ids.split(batch_size):
        _, cache = model.run_with_cache(chunk.to(model.cfg.device), names_filter=lambda n: n in names)
        acts = torch.stack([cache[n].sum(0).to(model.cfg.device) for n in names])
        total = acts if total is None else total + acts
    return total / input_ids.shape[0]


def logits_at(
    logits: Float[Tensor, "batch seq vocab"], positions: Int[Tensor, " batch"]
) -> Float[Tensor, "batch vocab"]:
    """Logits at each example's position (e.g. the last token)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)]


def _override_hook(act, hook: HookPoint, values, keep):
    values = values.to(act.device, act.dtype)
    return values.expand_as(act) if keep is None else torch.where(keep[..., None].to(act.device), act, values)


def override_hooks(
    kind: str,
    values: dict[int, Float[Tensor, "batch pos head d"]],
    keep: dict[int, Bool[Tensor, "batch pos head"]] | None = None,
) -> list[Hook]:
    """Hooks that overwrite each layer's `kind` activation with `values[layer]` (per example,
    per position) wherever `keep[layer]` is false, or everywhere when `keep` is None.

    Path patching freezes heads to their clean values with it (and puts the sender's corrupt
    value in the same tensor), so one hook per layer does both.
    """
    return [
        (hook_name(kind, layer), partial(_override_hook, values=v, keep=None if keep is None else keep[layer]))
        for layer, v in values.items()
    ]
