"""DCM's masked forward pass: each head's output (`hook_z`) at its positions becomes
m * z_base + (1 - m) * z_source for its mask value m, restarted from the base prompts' clean run
where `PairData` holds one (a patch at layer >= L and position >= p changes nothing before)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from et_circuits.core.hooks import Hook, logits_at, patch_hooks
from et_circuits.core.restart import run_suffix
from et_circuits.core.types import Head

from .pairs import PairData


def mask_hooks(
    heads: Sequence[Head],
    mask: Float[Tensor, " k"] | Float[Tensor, "batch k"],
    values: Float[Tensor, "batch slots k d_head"],
    positions: Int[Tensor, "batch slots"],
    n_layers: int,
    n_heads: int,
) -> list[Hook]:
    """Hooks setting each head's z at every slot of `positions` to m * z + (1 - m) * value:
    `hooks.patch_hooks` with weight 1 - m (differentiable in m). A mask per example (one row
    of `mask` each) lets several masks train in one batch."""
    device = values.device
    layer_idx = torch.tensor([layer for layer, _ in heads], dtype=torch.long, device=device)
    head_idx = torch.tensor([head for _, head in heads], dtype=torch.long, device=device)
    mask = mask.to(device)
    if mask.ndim == 1:
        weights = torch.zeros(n_layers, n_heads, device=device, dtype=mask.dtype)
        weights = weights.index_put((layer_idx, head_idx), 1 - mask)
    else:  # [layer, batch, head]
        row_idx = torch.arange(mask.shape[0], device=device)[:, None]
        weights = torch.zeros(mask.shape[0], n_layers, n_heads, device=device, dtype=mask.dtype)
        weights = weights.index_put((row_idx, layer_idx[None], head_idx[None]), 1 - mask).transpose(0, 1)
    new: dict[int, Tensor] = {}
    for layer in sorted({layer for layer, _ in heads}):
        cols = [i for i, (l, _) in enumerate(heads) if l == layer]
        full = values.new_zeros(values.shape[0], values.shape[1], n_heads, values.shape[3])
        full[:, :, [heads[i][1] for i in cols]] = values[:, :, cols]
        new[layer] = full
    return patch_hooks("z", new, positions, weights)


def masked_logits(
    model: HookedTransformer,
    heads: Sequence[Head],
    mask: Float[Tensor, " k"] | Float[Tensor, "batch k"],
    data: PairData,
) -> Float[Tensor, "batch vocab"]:
    """Last-position logits of the base prompts with the heads mixed by `mask` (one for all
    pairs, or one per pair); restarts from `data.run` when present (same result, far fewer
    tokens and layers)."""
    device = model.cfg.device
    offset = data.restart[1] if data.run is not None else 0
    hooks = []
    if heads:
        hooks = mask_hooks(
            heads,
            mask,
            data.values.to(device, model.cfg.dtype),
            torch.where(data.position >= 0, data.position - offset, -1).to(device),
            model.cfg.n_layers,
            model.cfg.n_heads,
        )
    if data.run is None:
        return logits_at(model.run_with_hooks(data.input_ids.to(device), fwd_hooks=hooks), data.last.to(device))
    return run_suffix(model, data.run, data.restart[0], offset, hooks, grad=True, read_at=data.last - offset)


@torch.no_grad()
def patched_logits(
    model: HookedTransformer,
    heads: Sequence[Head],
    selected: Bool[Tensor, " k"] | Bool[Tensor, "n k"],
    data: PairData,
    batch_size: int = 32,
) -> Float[Tensor, "n vocab"]:
    """Last-position logits of every pair (CPU, float32) when the selected heads (one selection
    for all pairs, or one per pair) are patched from the source into the base (the other heads
    untouched)."""
    mask = (~selected).float()
    out = []
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        chunk = data.take(rows)
        out.append(masked_logits(model, heads, mask if mask.ndim == 1 else mask[rows], chunk).float().cpu())
    return torch.cat(out)


@contextmanager
def frozen(model: HookedTransformer):
    """Inside the block no model weight takes a gradient (restored after): only the mask trains."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
