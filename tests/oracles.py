"""Independent oracles: each method written the most direct way, separately from the package,
with TransformerLens hooks only (whole forward passes, `run_with_cache` / `run_with_hooks`,
explicit loops over prompts and heads, no shortcuts), to compare the package's results with.

Prompts are anything with `input_ids`, `answers` and `positions` (name -> one index per prompt),
as `et_circuits.prompts.PromptSet`. Heads are (layer, head). Nothing here imports et_circuits.

What each oracle implements (the paper's semantics, /work/shared/paper/SPEC.md):
- `mean_ablation_logits`: every head's `hook_z` at every position replaced by its mean over a
  reference prompt set at that position, except each group's heads at that group's position;
  `table1_row`: full accuracy, circuit accuracy and faithfulness = circuit / full.
- `path_patching_score`: the frozen run (every head's `hook_z` clean, the sender's at p corrupt,
  MLPs free), read at the last token (no receivers) or through a receiver patch (the receivers'
  `hook_q` / `hook_k` / `hook_v` at p recorded in the frozen run and written into a fresh clean
  run); score = (mean p_patched - mean p_clean) / mean p_clean.
- `dcm_logits` / `dcm_loss`: at the group's position, z = m * z_base + (1 - m) * z_source (the
  source read at its own position); loss = -(mean target logit at the last token) +
  lambda * sum(1 - m); differentiable in m.
- `cmap_logits`: the base model with chosen heads' `hook_z` (or q / k / v) at a position
  overwritten by the source model's values on the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor

Head = tuple[int, int]


def hook_name(layer: int, kind: str = "z") -> str:
    return f"blocks.{layer}.attn.hook_{kind}"


@contextmanager
def per_query_head_kv(model):
    """With grouped-query attention, `hook_k` / `hook_v` are per kv head unless TransformerLens
    ungroups them; inside this block they are per query head (restored after)."""
    before = model.cfg.ungroup_grouped_query_attention
    if model.cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        model.set_ungroup_grouped_query_attention(before)


def at_last(logits: Tensor, prompts) -> Tensor:
    """Logits at each prompt's last token: [batch, vocab]."""
    rows = torch.arange(logits.shape[0])
    return logits[rows, prompts.positions["last"]]


def answer_prob(last_logits: Tensor, answers: Tensor) -> Tensor:
    """Softmax probability of each prompt's answer."""
    rows = torch.arange(last_logits.shape[0])
    return torch.softmax(last_logits.float(), dim=-1)[rows, answers]


def correct(last_logits: Tensor, answers: Tensor) -> Tensor:
    """Per prompt: is the argmax the answer?"""
    return last_logits.argmax(-1) == answers


# ---------------------------------------------------------------------------------------------
# Circuit evaluation by mean ablation (Table 1)


@torch.no_grad()
def mean_ablation_logits(model, prompts, reference, groups: Sequence[tuple[str, Sequence[Head]]]) -> Tensor:
    """Last-token logits of `prompts` with every head's `hook_z` at every position replaced by
    its mean over the `reference` prompts at that position, except, for each (position name,
    heads) in `groups`, those heads at that position of each prompt, which keep their own value.
    """
    if reference.input_ids.shape[1] != prompts.input_ids.shape[1]:
        raise ValueError("position-wise means need reference prompts of the same length")
    n_layers, n = model.cfg.n_layers, len(prompts)
    _, cache = model.run_with_cache(reference.input_ids)
    means = {layer: cache[hook_name(layer)].mean(dim=0) for layer in range(n_layers)}  # [pos, head, d]

    def ablate(act, hook, layer):
        out = means[layer][None].expand_as(act).clone()
        for position, heads in groups:
            for l, h in heads:
                if l != layer:
                    continue
                for b in range(n):
                    p = int(prompts.positions[position][b])
                    out[b, p, h] = act[b, p, h]
        return out

    hooks = [(hook_name(layer), partial(ablate, layer=layer)) for layer in range(n_layers)]
    return at_last(model.run_with_hooks(prompts.input_ids, fwd_hooks=hooks), prompts)


@torch.no_grad()
def table1_row(model, prompts, reference, groups) -> dict[str, float]:
    """Full-model accuracy, mean-ablation circuit accuracy and faithfulness = circuit / full."""
    full = correct(at_last(model(prompts.input_ids), prompts), prompts.answers).float().mean().item()
    circ = correct(mean_ablation_logits(model, prompts, reference, groups), prompts.answers).float().mean().item()
    return {"full": full, "circuit": circ, "faithfulness": circ / full}


# ---------------------------------------------------------------------------------------------
# Path patching


@torch.no_grad()
def path_patching_score(
    model,
    clean,
    corrupt,
    sender: Head,
    position: str,
    receivers: Sequence[Head] = (),
    kind: str | None = None,
) -> float:
    """Score of one sender head at `position` (see the module docstring), from whole forward
    passes: a clean run and a corrupt run with every `hook_z` cached, the frozen run, and (with
    receivers) the receiver run."""
    n, n_layers = len(clean), model.cfg.n_layers
    pos = clean.positions[position]
    with per_query_head_kv(model):
        clean_logits, clean_cache = model.run_with_cache(clean.input_ids)
        _, corrupt_cache = model.run_with_cache(corrupt.input_ids)
        p_clean = answer_prob(at_last(clean_logits, clean), clean.answers)

        def freeze(act, hook, layer):
            frozen = clean_cache[hook.name].clone()
            if layer == sender[0]:
                for b in range(n):
                    frozen[b, pos[b], sender[1]] = corrupt_cache[hook.name][b, pos[b], sender[1]]
            return frozen

        frozen_hooks = [(hook_name(layer), partial(freeze, layer=layer)) for layer in range(n_layers)]
        if not receivers:
            logits = model.run_with_hooks(clean.input_ids, fwd_hooks=frozen_hooks)
        else:
            names = sorted({hook_name(layer, kind) for layer, _ in receivers})
            recorded: dict[str, Tensor] = {}

            def record(act, hook):
                recorded[hook.name] = act.clone()

            model.run_with_hooks(clean.input_ids, fwd_hooks=frozen_hooks + [(name, record) for name in names])

            def patch(act, hook):
                out = act.clone()
                for layer, head in receivers:
                    if hook_name(layer, kind) == hook.name:
                        for b in range(n):
                            out[b, pos[b], head] = recorded[hook.name][b, pos[b], head]
                return out

            logits = model.run_with_hooks(clean.input_ids, fwd_hooks=[(name, patch) for name in names])
        p = answer_prob(at_last(logits, clean), clean.answers)
    return ((p.mean() - p_clean.mean()) / p_clean.mean()).item()


# ---------------------------------------------------------------------------------------------
# DCM


def dcm_logits(model, base, source, position: str, heads: Sequence[Head], mask: Tensor) -> Tensor:
    """Last-token logits of the base prompts where, for each i, head heads[i]'s `hook_z` at the
    base prompt's `position` becomes mask[i] * z_base + (1 - mask[i]) * z_source, z_source being
    that head's `hook_z` in a clean run of the paired source prompt at the source's own
    `position`. Differentiable in `mask`."""
    n = len(base)
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source.input_ids)
    base_pos, source_pos = base.positions[position], source.positions[position]

    def mix(act, hook, layer):
        out = act.clone()
        for i, (l, h) in enumerate(heads):
            if l != layer:
                continue
            for b in range(n):
                z_base = act[b, base_pos[b], h]
                z_source = source_cache[hook.name][b, source_pos[b], h]
                out[b, base_pos[b], h] = mask[i] * z_base + (1 - mask[i]) * z_source
        return out

    layers = sorted({layer for layer, _ in heads})
    hooks = [(hook_name(layer), partial(mix, layer=layer)) for layer in layers]
    return at_last(model.run_with_hooks(base.input_ids, fwd_hooks=hooks), base)


def dcm_loss(model, base, source, target: Tensor, position: str, heads, mask: Tensor, lam: float) -> Tensor:
    """-(mean logit of each pair's target at the last token) + lam * sum(1 - mask)."""
    logits = dcm_logits(model, base, source, position, heads, mask)
    rows = torch.arange(len(base))
    return -logits[rows, target].mean() + lam * (1 - mask).sum()


# ---------------------------------------------------------------------------------------------
# CMAP


@torch.no_grad()
def cmap_logits(base_model, source_model, prompts, sites: Sequence[tuple[str, str, Sequence[Head]]]) -> Tensor:
    """Last-token logits of `base_model` on `prompts` where, for each (kind, position name,
    heads) in `sites`, those heads' `hook_{kind}` at that position of each prompt are
    overwritten by `source_model`'s values on the same prompt."""
    n = len(prompts)
    _, source_cache = source_model.run_with_cache(prompts.input_ids)

    def overwrite(act, hook):
        out = act.clone()
        for kind, position, heads in sites:
            for layer, head in heads:
                if hook_name(layer, kind) != hook.name:
                    continue
                for b in range(n):
                    p = int(prompts.positions[position][b])
                    out[b, p, head] = source_cache[hook.name][b, p, head]
        return out

    names = sorted({hook_name(layer, kind) for kind, _, heads in sites for layer, _ in heads})
    logits = base_model.run_with_hooks(prompts.input_ids, fwd_hooks=[(name, overwrite) for name in names])
    return at_last(logits, prompts)
