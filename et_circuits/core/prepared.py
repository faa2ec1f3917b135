"""Prepared clean and corrupt runs: what the fast exact methods (path patching, the position
sweep) start from. One clean forward of every prompt keeps each layer's residual stream, keys
and values (a `CleanRun`), the clean logits at the last position and every head's clean
`hook_z` / `hook_q` / `hook_k` / `hook_v` at each prepared position; each corrupt prompt is then
run only from its first changed token, attending to the clean prefix, for its `hook_z` there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .hooks import at_positions, hook_name, keep_hooks, logits_at, per_head_values
from .prompts import LAST, PromptSet
from .restart import CleanRun, check_supported, earliest, embed, on_layers, output_device, run_from, same_start_chunks
from .settings import QUIET, RunSettings
from .types import INPUT_KINDS


@dataclass
class PreparedRuns:
    """What the fast methods start from, made once for every step (`prepare_runs`): the clean run
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
    ) -> PreparedRuns:
        """The rows of some prompts, each layer's on its device in `model`; only the
        activations at `positions` (default all prepared positions)."""
        index = index.to(self.last_logits.device)
        keep = set(self.positions if positions is None else positions)
        pick = partial(on_layers, model, index=index)
        return PreparedRuns(
            self.run.take(index, model),
            self.last_logits[index].to(output_device(model)),
            {
                kind: {p: pick(acts) for p, acts in by_spec.items() if p in keep}
                for kind, by_spec in self.clean_at.items()
            },
            {p: pick(zs) for p, zs in self.corrupt_z.items() if p in keep},
        )

    @property
    def positions(self) -> list[str]:
        return list(self.corrupt_z)


@torch.no_grad()
def prepare_runs(
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
    clean.check_vocab(model.cfg.d_vocab), corrupt.check_vocab(model.cfg.d_vocab)
    n_layers, device = model.cfg.n_layers, model.cfg.device
    layers = range(n_layers)
    kinds = ("z", *INPUT_KINDS)
    kept = {hook_name("resid_pre", layer) for layer in layers}
    kept |= {hook_name(k, layer) for k in kinds for layer in layers}
    runs: list[CleanRun] = []
    last_logits = []
    clean_at = {kind: {p: {layer: [] for layer in layers} for p in positions} for kind in kinds}
    with per_head_values(model):
        parts = list(clean.chunks(settings.batch_size))
        for c in tqdm(parts, desc="path patching: clean runs", disable=not settings.progress, leave=False):
            c = c.to(device)
            logits, cache = model.run_with_cache(c.input_ids, names_filter=lambda n: n in kept)
            runs.append(
                CleanRun(
                    {layer: cache[hook_name("resid_pre", layer)].cpu() for layer in layers},
                    {layer: cache[hook_name("k", layer)].cpu() for layer in layers},
                    {layer: cache[hook_name("v", layer)].cpu() for layer in layers},
                )
            )
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
            cache: dict[int, Tensor] = {}
            run_from(model, x, 0, keys, values, keep_hooks("z", layers, cache))
            for p in positions:
                at = clean[index].position_set(p)
                at = torch.where(at >= 0, at - s, at)
                for layer in layers:
                    prepared.corrupt_z[p][layer][index] = at_positions(cache[layer], at).cpu()
            del cache
    return prepared


def _first_change(clean: PromptSet, corrupt: PromptSet, positions: Sequence[str]) -> Int[Tensor, " batch"]:
    """Where each corrupt run starts: its first token that differs from the clean prompt, or
    the earliest sender position if that comes first (corrupt heads are read there)."""
    differs = clean.input_ids != corrupt.input_ids.to(clean.device)
    first = torch.where(differs.any(1), differs.int().argmax(1), differs.shape[1])
    for p in positions:
        first = torch.minimum(first, earliest(clean.position_set(p)))
    return first
