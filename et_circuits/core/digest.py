"""A short digest naming a model's weights and dtype, for reuse keys: finished results are
reused only for the weights that computed them. It reads a sample of every parameter (its
first 1024 entries and 1024 spread evenly over it), so its cost does not grow with the
model's size beyond one small read per tensor (a few hundred at 7B)."""

from __future__ import annotations

import hashlib

import torch
from transformer_lens import HookedTransformer

SAMPLE = 1024  # entries read from each parameter, twice: the first ones and an even spread


@torch.no_grad()
def weights_digest(model: HookedTransformer) -> str:
    """sha256 (16 hex digits) over the dtype, every parameter's name and shape, its first
    `SAMPLE` entries and `SAMPLE` entries at an even stride over the whole tensor."""
    digest = hashlib.sha256(str(model.cfg.dtype).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLE)
        digest.update(f"{name} {tuple(p.shape)}".encode())
        for part in (flat[:SAMPLE], flat[::stride][:SAMPLE]):
            digest.update(part.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
