"""Running a model over a batch (optionally with hooks) and scoring its answers at the last token."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from .data import Batch
from .hooks import Hook, logits_at

HooksFor = Callable[[Batch], list[Hook]]


def n_correct(
    logits: Float[Tensor, "batch seq vocab"], last: Int[Tensor, " batch"], answer: Int[Tensor, " batch"]
) -> int:
    """How many prompts' argmax at their last position is the answer."""
    return int((logits_at(logits, last).argmax(-1) == answer.to(logits.device)).sum())


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


def _keep(act, hook, store, layer):
    store[layer] = act.detach()


@dataclass
class CleanRun:
    """One unpatched forward pass kept for resuming: logits, and every layer's `resid_pre` and
    (pre-rotary) keys and values."""

    logits: Float[Tensor, "batch seq vocab"]
    resid: dict[int, Float[Tensor, "batch seq d_model"]]
    keys: dict[int, Float[Tensor, "batch seq kv_head d_head"]]
    values: dict[int, Float[Tensor, "batch seq kv_head d_head"]]


@torch.no_grad()
def clean_run(model: HookedTransformer, input_ids: Int[Tensor, "batch seq"]) -> CleanRun:
    """Run `model` once, keeping what `resume` restarts from."""
    run = CleanRun(None, {}, {}, {})
    hooks = []
    for layer in range(model.cfg.n_layers):
        hooks += [
            (f"blocks.{layer}.hook_resid_pre", partial(_keep, store=run.resid, layer=layer)),
            (f"blocks.{layer}.attn.hook_k", partial(_keep, store=run.keys, layer=layer)),
            (f"blocks.{layer}.attn.hook_v", partial(_keep, store=run.values, layer=layer)),
        ]
    run.logits = model.run_with_hooks(input_ids.to(model.cfg.device), fwd_hooks=hooks)
    return run


@torch.no_grad()
def resume(
    model: HookedTransformer, run: CleanRun, layer: int, start: int, fwd_hooks: list[Hook] = ()
) -> Float[Tensor, "batch suffix vocab"]:
    """`resume_with_grad` without gradients (every caller but DCM's mask training)."""
    return resume_with_grad(model, run, layer, start, fwd_hooks)


def resume_with_grad(
    model: HookedTransformer, run: CleanRun, layer: int, start: int, fwd_hooks: list[Hook] = ()
) -> Float[Tensor, "batch suffix vocab"]:
    """Logits of positions `start`.. of an intervention that touches only layers >= `layer`
    and positions >= `start`: everything below is the clean run's, so the suffix restarts from
    its clean residual at `layer`, attending to the clean keys/values of positions < `start`.

    Exact, and much cheaper when the intervention sits near the end of the prompt. Hooks see
    suffix coordinates on the query axis (position p is p - start); key axes of attention
    scores keep full positions.
    """
    cache = prefix_cache(run.keys, run.values, start, layer, model.cfg.n_layers)
    return model.run_with_hooks(
        run.resid[layer][:, start:], start_at_layer=layer, past_kv_cache=cache, fwd_hooks=list(fwd_hooks)
    )


class _SharedPrefix(TransformerLensKeyValueCacheEntry):
    """Frozen clean keys/values of the positions before a suffix, stored once per prompt. A
    suffix batch may hold each prompt several times (rows repeat-major, as path patching's
    many senders per pass): the prefix is tiled only when its layer runs."""

    def append(self, new_keys, new_values):
        reps = new_keys.shape[0] // self.past_keys.shape[0]
        keys = torch.cat([self.past_keys.repeat(reps, 1, 1, 1), new_keys], dim=1)
        values = torch.cat([self.past_values.repeat(reps, 1, 1, 1), new_values], dim=1)
        return keys, values


def prefix_cache(
    keys: Sequence[Tensor] | Mapping[int, Tensor],
    values: Sequence[Tensor] | Mapping[int, Tensor],
    start: int,
    first_layer: int,
    n_layers: int,
) -> TransformerLensKeyValueCache:
    """A frozen KV cache of the clean keys/values at positions < `start` of every layer from
    `first_layer` on (indexed by layer): what a forward restarted there attends to."""
    entries = [
        _SharedPrefix(keys[i][:, :start], values[i][:, :start], frozen=True) if i >= first_layer else None
        for i in range(n_layers)
    ]
    prompts = keys[first_layer]
    mask = torch.ones(prompts.shape[0], start, dtype=torch.int, device=prompts.device)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)
