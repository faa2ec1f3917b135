"""Running a model over a batch (optionally with hooks) and scoring its answers at the last token."""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .data import Batch
from .hooks import Hook, logits_at

HooksFor = Callable[[Batch], list[Hook]]


@torch.no_grad()
def last_logits(
    model: HookedTransformer,
    batch: Batch,
    hooks_for: HooksFor | None = None,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "forward",
) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's last token; `hooks_for(chunk)` gives the hooks for each chunk."""
    out = []
    chunks = list(batch.chunks(batch_size))
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        chunk = chunk.to(model.cfg.device)
        hooks = hooks_for(chunk) if hooks_for else []
        logits = model.run_with_hooks(chunk.input_ids, fwd_hooks=hooks)
        out.append(logits_at(logits, chunk.last).float().cpu())
    return torch.cat(out)


def accuracy(
    model: HookedTransformer,
    batch: Batch,
    hooks_for: HooksFor | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> float:
    """Fraction of prompts whose argmax at the last token is the answer token."""
    logits = last_logits(model, batch, hooks_for, batch_size, progress, desc="accuracy")
    return (logits.argmax(-1) == batch.answer).float().mean().item()
