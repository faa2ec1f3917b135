"""Restarting a forward pass from a clean prefix: the one home of "an intervention at layers
>= L and positions >= p changes nothing below L or before p".

A `CleanRun` keeps what an unpatched forward leaves for such restarts: per layer, the residual
stream entering it (`resid_pre`) and its keys and values (`hook_k` / `hook_v`, before rotary,
in whatever head layout the model had when the run was made). `resume` then recomputes only
layers >= L at positions >= p, attending to the clean keys and values of the earlier
positions through a frozen KV cache. The result equals the full forward up to float rounding
(tested); DCM, CMAP, knockout and fast path patching all restart this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from .errors import SetupError
from .hooks import Hook

SUPPORTED_POSITIONAL = ("rotary", "standard")


def check_supported(model: HookedTransformer) -> None:
    """SetupError (one line) for model configurations whose activations a restart cannot
    reproduce exactly: positional schemes other than rotary or learned absolute embeddings,
    and local (sliding-window) attention."""
    cfg = model.cfg
    if cfg.positional_embedding_type not in SUPPORTED_POSITIONAL:
        raise SetupError(
            f"positional embeddings {cfg.positional_embedding_type!r} are not supported; "
            f"supported: {', '.join(SUPPORTED_POSITIONAL)}"
        )
    if cfg.attn_types is not None and "local" in cfg.attn_types:
        raise SetupError("models with local (sliding-window) attention layers are not supported")


@dataclass
class CleanRun:
    """An unpatched forward kept for restarts: `resid[l]` ([batch, seq, d_model], the input of
    layer l), `keys[l]` / `values[l]` ([batch, positions, kv_heads, d_head]; possibly only a
    prefix of the positions) and, optionally, the logits. Layers may be a subset (`restrict`)."""

    resid: dict[int, Float[Tensor, "batch seq d_model"]] = field(default_factory=dict)
    keys: dict[int, Float[Tensor, "batch pos kv_head d_head"]] = field(default_factory=dict)
    values: dict[int, Float[Tensor, "batch pos kv_head d_head"]] = field(default_factory=dict)
    logits: Float[Tensor, "batch seq vocab"] | None = None

    def __len__(self) -> int:
        return next(iter(self.resid.values())).shape[0]

    def take(self, index: Int[Tensor, " n"] | slice, device: torch.device | str | None = None) -> "CleanRun":
        """The rows of some prompts (on `device`, default: where they are)."""
        pick = lambda t: t[index] if device is None else t[index].to(device)  # noqa: E731
        return CleanRun(
            {l: pick(t) for l, t in self.resid.items()},
            {l: pick(t) for l, t in self.keys.items()},
            {l: pick(t) for l, t in self.values.items()},
            None if self.logits is None else pick(self.logits),
        )

    def restrict(self, layer: int, start: int) -> "CleanRun":
        """Only what `resume(model, run, layer, start)` reads: the residual entering `layer`
        and the keys / values of positions < `start` in layers >= `layer` (the memory a
        restart at that point needs)."""
        later = [l for l in self.keys if l >= layer]
        return CleanRun(
            {layer: self.resid[layer]},
            {l: self.keys[l][:, :start] for l in later},
            {l: self.values[l][:, :start] for l in later},
        )

    @staticmethod
    def concat(runs: Sequence["CleanRun"]) -> "CleanRun":
        """Chunks of one clean run, joined along the batch."""
        def cat(name: str) -> dict[int, Tensor]:
            return {l: torch.cat([getattr(r, name)[l] for r in runs]) for l in getattr(runs[0], name)}

        logits = None if runs[0].logits is None else torch.cat([r.logits for r in runs])
        return CleanRun(cat("resid"), cat("keys"), cat("values"), logits)


def _keep(act, hook, store, layer):
    store[layer] = act.detach()


@torch.no_grad()
def clean_run(
    model: HookedTransformer, input_ids: Int[Tensor, "batch seq"], fwd_hooks: Sequence[Hook] = ()
) -> CleanRun:
    """Run `model` once (with optional extra hooks that only read) and keep what `resume`
    restarts from, plus the logits."""
    run = CleanRun()
    hooks = list(fwd_hooks)
    for layer in range(model.cfg.n_layers):
        hooks += [
            (f"blocks.{layer}.hook_resid_pre", partial(_keep, store=run.resid, layer=layer)),
            (f"blocks.{layer}.attn.hook_k", partial(_keep, store=run.keys, layer=layer)),
            (f"blocks.{layer}.attn.hook_v", partial(_keep, store=run.values, layer=layer)),
        ]
    run.logits = model.run_with_hooks(input_ids.to(model.cfg.device), fwd_hooks=hooks)
    return run


def resume(
    model: HookedTransformer,
    run: CleanRun,
    layer: int,
    start: int,
    fwd_hooks: Sequence[Hook] = (),
    grad: bool = False,
) -> Float[Tensor, "batch suffix vocab"]:
    """Logits of positions `start`.. of an intervention (`fwd_hooks`) that touches only layers
    >= `layer` and positions >= `start`: the suffix restarts from its clean residual at `layer`,
    attending to the clean keys / values of positions < `start`.

    Hooks see suffix coordinates on the query axis (position p is p - start); key axes of
    attention scores keep full positions. `grad`: keep the autograd graph (DCM's masks)."""
    cache = prefix_cache(run.keys, run.values, start, layer, model.cfg.n_layers)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return model.run_with_hooks(
            run.resid[layer][:, start:], start_at_layer=layer, past_kv_cache=cache, fwd_hooks=list(fwd_hooks)
        )


def embed(model: HookedTransformer, input_ids: Int[Tensor, "batch suffix"], start: int) -> Float[Tensor, "batch suffix d_model"]:
    """The residual stream entering layer 0 for tokens placed at positions `start`.. (token
    embeddings, plus learned positional embeddings where the model has them)."""
    check_supported(model)
    x = model.embed(input_ids)
    if model.cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed(input_ids, start)
    return x


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


def restart_bytes(model: HookedTransformer, n: int, seq: int, layer: int, start: int) -> int:
    """Memory of `CleanRun.restrict(layer, start)` for n prompts of length seq."""
    cfg = model.cfg
    kv_heads = cfg.n_key_value_heads or cfg.n_heads
    per_prompt = seq * cfg.d_model + 2 * start * (cfg.n_layers - layer) * kv_heads * cfg.d_head
    return n * per_prompt * torch.finfo(cfg.dtype).bits // 8


@torch.no_grad()
def restarts(
    model: HookedTransformer,
    input_ids: Int[Tensor, "n seq"],
    points: Sequence[tuple[int, int]],
    batch_size: int = 32,
) -> list[CleanRun]:
    """`clean_run(...).restrict(layer, start)` for every (layer, start) in `points`, from one
    clean run per chunk of `batch_size` prompts."""
    parts: list[list[CleanRun]] = [[] for _ in points]
    for chunk in input_ids.split(batch_size):
        run = clean_run(model, chunk)
        for i, (layer, start) in enumerate(points):
            parts[i].append(run.restrict(layer, start))
    return [CleanRun.concat(p) for p in parts]
