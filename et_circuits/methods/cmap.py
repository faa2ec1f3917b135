"""Cross-Model Activation Patching (CMAP; Prakash et al. 2024, Figure 3).

The same prompts run through a *source* model (e.g. a fine-tuned one) and a *base* model of the
same geometry. In the base model, a chosen set of heads, each at its group's positions, takes
the source model's activations; the base model's metric (accuracy by default) then says how much of the source
model's behaviour those heads carry.

- Output patching overwrites the heads' outputs before W_O (`hook_z`).
- Input patching overwrites the heads' query, key and/or value vectors (`hook_q`, `hook_k`,
  `hook_v`: the projections, before any q/k norm and rotary) at the group's positions only.
  (OLMo-2 normalises a position's queries, and its keys, over all heads together, so there a
  patched head's query or key also rescales the other heads'.) A query at position p only
  changes what position p reads. A key or value at p is read by that head at every
  position >= p. Keys and values at other positions stay the base model's.
- With grouped-query attention a key/value head serves several query heads, so patching one
  query head's key or value is not defined; that raises `SetupError`.

The two models may sit on different devices: source activations move to the base model's. The
source activations of a chunk are read once, in one forward pass. Each patched base run is
exact but only recomputes what the patch can change: layers from the first patched one,
positions from the first patched one (`restart.run_suffix`, from one clean base run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.distributed import combine_nan, mine
from et_circuits.core.errors import SetupError
from et_circuits.core.hooks import Hook, logits_at, patch_hooks, store_hooks
from et_circuits.core.metrics import Metric, accuracy, metric_name, metric_total
from et_circuits.core.prompts import LAST, PromptSet
from et_circuits.core.restart import clean_run, run_suffix
from et_circuits.core.serial import frame, number
from et_circuits.core.settings import QUIET, RunSettings

# Which activations each patch kind overwrites.
PATCHES: dict[str, tuple[str, ...]] = {
    "z": ("z",),
    "q": ("q",),
    "k": ("k",),
    "v": ("v",),
    "qk": ("q", "k"),
    "qkv": ("q", "k", "v"),
}
INPUT_PATCHES = ("q", "k", "v", "qk", "qkv")

Site = tuple[str, str]  # (activation kind, position spec)
Masks = dict[Site, Bool[Tensor, "layer head"]]


def check_geometry(base: HookedTransformer, source: HookedTransformer) -> None:
    """SetupError unless both models have the same head layout and vocabulary, so that a head's
    activation and a token id mean the same slot in both."""
    fields = ("n_layers", "n_heads", "d_head", "d_model", "n_key_value_heads", "d_vocab")
    diff = [
        f"{f} {getattr(base.cfg, f)} vs {getattr(source.cfg, f)}"
        for f in fields
        if getattr(base.cfg, f) != getattr(source.cfg, f)
    ]
    if diff:
        raise SetupError(f"cannot patch between models of different geometry (base vs source): {'; '.join(diff)}")
    tb, ts = base.tokenizer, source.tokenizer
    if tb is not None and ts is not None and tb.get_vocab() != ts.get_vocab():
        raise SetupError("cannot patch between models with different tokenizers")


def check_patch(model: HookedTransformer, patch: str) -> None:
    """SetupError for an unknown patch kind, or key/value patching of shared GQA heads."""
    if patch not in PATCHES:
        raise SetupError(f"unknown patch {patch!r}; expected one of {', '.join(PATCHES)}")
    grouped = model.cfg.n_key_value_heads not in (None, model.cfg.n_heads)
    if grouped and not model.cfg.ungroup_grouped_query_attention and {"k", "v"} & set(PATCHES[patch]):
        raise SetupError(
            f"patch {patch!r} needs per-head keys and values, but this model shares each of its "
            f"{model.cfg.n_key_value_heads} key/value heads among {model.cfg.n_heads // model.cfg.n_key_value_heads} "
            "query heads (grouped-query attention); use 'z' or 'q'"
        )


def input_patches_for(model: HookedTransformer) -> tuple[str, ...]:
    """The input patch kinds `check_patch` allows on `model` (only "q" with grouped-query
    attention, whose key/value heads are shared)."""
    allowed = []
    for patch in INPUT_PATCHES:
        try:
            check_patch(model, patch)
            allowed.append(patch)
        except SetupError:
            pass
    return tuple(allowed)


def site_masks(heads: Circuit, patch: str, n_layers: int, n_heads: int) -> Masks:
    """(kind, position spec) -> heads to overwrite there: each group's heads at each of its
    positions, for every activation the patch kind overwrites; sites with no head are left out."""
    heads.validate(n_layers, n_heads)
    masks: Masks = {}
    for group in heads.groups:
        m = heads.mask(group, n_layers, n_heads)
        if not m.any():
            continue
        for spec in heads.positions_of(group):
            for kind in PATCHES[patch]:
                key = (kind, spec)
                masks[key] = masks[key] | m if key in masks else m
    return masks


def first_layer(masks: Masks) -> int:
    """The lowest layer any site patches: layers below it are untouched by the patch."""
    return min(int(m.any(1).nonzero()[0]) for m in masks.values())


@torch.no_grad()
def read_source(
    source: HookedTransformer, prompts: PromptSet, sites: Iterable[Site]
) -> tuple[Float[Tensor, "batch seq vocab"], dict[Site, dict[int, Tensor]]]:
    """One source forward pass: its logits and, per site, every layer's activation there."""
    prompts = prompts.to(source.cfg.device)
    values: dict[Site, dict[int, Tensor]] = {}
    hooks: list[Hook] = []
    for kind, spec in sites:
        values[(kind, spec)] = {}
        hooks += store_hooks(kind, prompts.position_set(spec), range(source.cfg.n_layers), values[(kind, spec)])
    logits = source.run_with_hooks(prompts.input_ids, fwd_hooks=hooks)
    return logits, values


def write_hooks(
    values: Mapping[Site, dict[int, Tensor]], prompts: PromptSet, masks: Masks, offset: int = 0
) -> list[Hook]:
    """Hooks overwriting the masked heads at each site with the source's values (positions
    shifted by `offset` for a run restarted there)."""
    hooks: list[Hook] = []
    for (kind, spec), mask in masks.items():
        at = prompts.position_set(spec)
        at = torch.where(at >= 0, at - offset, at)
        hooks += patch_hooks(kind, values[(kind, spec)], at, mask)
    return hooks


@torch.no_grad()
def cross_model_logits(
    base: HookedTransformer, source: HookedTransformer, prompts: PromptSet, masks: Masks
) -> Float[Tensor, "batch seq vocab"]:
    """Base-model logits with the masked heads at each site overwritten by the source model's
    activations on the same prompts (the primitive that `cmap` batches)."""
    check_geometry(base, source)
    for kind, _ in masks:
        check_patch(base, kind)
    _, values = read_source(source, prompts, masks.keys())
    prompts = prompts.to(base.cfg.device)
    return base.run_with_hooks(prompts.input_ids, fwd_hooks=write_hooks(values, prompts, masks))


@dataclass(frozen=True)
class Variant:
    """One patched configuration: a head set (groups of heads with their positions) and the
    patch kind applied to all of them: "z" (outputs) or an input patch, "q", "k", "v", "qk" or
    "qkv" (see `PATCHES`)."""

    name: str
    patch: str
    heads: Circuit

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    def to_json(self) -> dict:
        return {"name": self.name, "patch": self.patch, "heads": self.heads.to_dict()}

    @classmethod
    def from_json(cls, d: dict) -> Variant:
        return cls(d["name"], d["patch"], Circuit.from_dict(d["heads"]))


class VariantScore(NamedTuple):
    """A variant and the base model's metric with it patched in (NaN: a variant with no heads,
    not patched)."""

    variant: Variant
    value: float


@dataclass(frozen=True)
class CmapResult:
    """`metric` on one prompt set (`n` prompts): the base and source models alone, and the base
    model with each variant patched from the source."""

    base: float
    source: float
    variants: tuple[VariantScore, ...]
    n: int
    metric: str = "accuracy"

    __hash__ = None

    def to_frame(self):
        """One row per variant: name, patch, heads, value, and both models' own values."""
        rows = [
            {
                "set": v.name,
                "patch": v.patch,
                "n_heads": v.n_heads,
                "value": value,
                "base": self.base,
                "source": self.source,
            }
            for v, value in self.variants
        ]
        return frame(rows, ["set", "patch", "n_heads", "value", "base", "source"])

    def to_json(self) -> dict:
        return {
            "base": self.base,
            "source": self.source,
            "n": self.n,
            "metric": self.metric,
            "variants": [{**v.to_json(), "value": None if math.isnan(x) else x} for v, x in self.variants],
        }

    @classmethod
    def from_json(cls, d: dict) -> CmapResult:
        variants = tuple(
            VariantScore(Variant.from_json(v), math.nan if v["value"] is None else v["value"]) for v in d["variants"]
        )
        return cls(d["base"], d["source"], variants, d["n"], d["metric"])

    def __repr__(self) -> str:
        patched = ", ".join(f"{v.name}/{v.patch}={number(x)}" for v, x in self.variants)
        return (
            f"CmapResult({self.metric}: base {number(self.base)}, source {number(self.source)}, n={self.n}; "
            f"{patched or 'no variants'})"
        )


@torch.no_grad()
def cmap(
    base: HookedTransformer,
    source: HookedTransformer,
    prompts: PromptSet,
    variants: Sequence[Variant],
    *,
    metric: Metric = accuracy,
    settings: RunSettings = QUIET,
) -> CmapResult:
    """`metric` (default accuracy) of the base model, of the source model, and of the base model
    with each variant's heads patched from the source, all on `prompts`."""
    check_geometry(base, source)
    prompts.check_vocab(base.cfg.d_vocab)
    n_layers, n_heads = base.cfg.n_layers, base.cfg.n_heads
    masks = []
    for v in variants:
        check_patch(base, v.patch)
        masks.append(site_masks(v.heads, v.patch, n_layers, n_heads))
    sites = sorted({site for m in masks for site in m})
    totals = torch.full((len(variants),), math.nan, dtype=torch.float64)  # n x metric, this rank's variants
    base_total = source_total = 0.0
    chunks = list(prompts.chunks(settings.batch_size))
    for chunk in tqdm(chunks, desc="cmap", disable=not settings.progress, leave=False):
        source_logits, values = read_source(source, chunk, sites)
        values = {site: {l: v.to(base.cfg.device) for l, v in by_layer.items()} for site, by_layer in values.items()}
        chunk = chunk.to(base.cfg.device)
        last = chunk.position(LAST)
        run = clean_run(base, chunk.input_ids)
        source_total += metric_total(metric, logits_at(source_logits, last), chunk)
        base_total += metric_total(metric, logits_at(run.logits, last), chunk)
        for i in mine(len(masks)):  # under torchrun, this rank's share of the variants
            m = masks[i]
            if not m:
                continue
            first = min(_earliest(chunk.position_set(spec)) for _, spec in m)  # first position the patch changes
            hooks = write_hooks(values, chunk, m, first)
            logits = run_suffix(base, run, first_layer(m), first, hooks, read_at=last - first)
            totals[i] = totals[i].nan_to_num(0.0) + metric_total(metric, logits, chunk)
    n = len(prompts)
    scores = (combine_nan(totals) / n).tolist()
    return CmapResult(
        base_total / n,
        source_total / n,
        tuple(VariantScore(v, x) for v, x in zip(variants, scores)),
        n,
        metric_name(metric),
    )


def _earliest(at: Tensor) -> int:
    valid = at[at >= 0]
    return int(valid.min()) if valid.numel() else 0
