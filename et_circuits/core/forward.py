"""Plain forward passes over a `PromptSet`: the logits at each prompt's last position, and a
metric of them (`measure`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .hooks import Hook, logits_at
from .metrics import Metric, accuracy, metric_value
from .prompts import LAST, PromptSet
from .settings import QUIET, RunSettings

HooksFor = Callable[[PromptSet], list[Hook]]


@torch.no_grad()
def last_logits(
    model: HookedTransformer,
    prompts: PromptSet,
    *,
    hooks_for: HooksFor | None = None,
    settings: RunSettings = QUIET,
    desc: str = "forward",
) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's last position (on CPU); `hooks_for(chunk)` gives each chunk's hooks."""
    prompts.check_vocab(model.cfg.d_vocab)
    out = []
    chunks = list(prompts.chunks(settings.batch_size))
    for chunk in tqdm(chunks, desc=desc, disable=not settings.progress, leave=False):
        chunk = chunk.to(model.cfg.device)
        hooks = hooks_for(chunk) if hooks_for else []
        logits = model.run_with_hooks(chunk.input_ids, fwd_hooks=hooks)
        out.append(logits_at(logits, chunk.position(LAST)).float().cpu())
    return torch.cat(out)


def measure(
    model: HookedTransformer,
    prompts: PromptSet,
    metric: Metric = accuracy,
    *,
    hooks_for: HooksFor | None = None,
    settings: RunSettings = QUIET,
) -> float:
    """`metric` of `model` on `prompts` (default: accuracy), from the logits at each prompt's
    last position (`hooks_for(chunk)`: hooks to run each chunk with)."""
    logits = last_logits(model, prompts, hooks_for=hooks_for, settings=settings, desc="measure")
    return metric_value(metric(logits, prompts.to("cpu")))
