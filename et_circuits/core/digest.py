"""A short digest naming a model's weights and dtype, for reuse keys: finished results are
reused only for the weights that computed them. It reads a sample of every parameter (its
first and last 1024 entries and 1024 spread evenly over it, gathered without copying the
tensor), so at 7B it reads about a million numbers, not the 7B weights. An edit of a few weights
that the sample misses goes unnoticed: a fine-tuned model changes whole tensors."""

from __future__ import annotations

import hashlib

import torch
from transformer_lens import HookedTransformer

SAMPLE = 1024  # entries read from each parameter, three times: the first, the last, an even spread


@torch.no_grad()
def weights_digest(model: HookedTransformer) -> str:
    """sha256 (16 hex digits) over the dtype, every parameter's name and shape, its first and
    last `SAMPLE` entries and `SAMPLE` entries at an even stride over the whole tensor (in
    row-major order, whatever the tensor's memory layout)."""
    digest = hashlib.sha256(str(model.cfg.dtype).encode())
    for name, p in model.named_parameters():
        n = p.numel()
        first, last = torch.arange(min(n, SAMPLE)), torch.arange(max(0, n - SAMPLE), n)
        at = torch.cat([first, last, torch.arange(0, n, max(1, n // SAMPLE))[:SAMPLE]])
        sample = p.detach()[torch.unravel_index(at.to(p.device), p.shape)] if p.ndim else p.detach().reshape(1)
        digest.update(f"{name} {tuple(p.shape)}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
