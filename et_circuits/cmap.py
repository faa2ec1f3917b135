"""Cross-Model Activation Patching (CMAP, the paper's Figure 3).

The same prompts run through a fine-tuned *source* model and the *base* model. In the base
model, a chosen set of heads, each at its circuit group's position, takes the source model's
activations; the base model's accuracy then says how much of the fine-tuned model's gain those
heads carry.

- Output patching overwrites the heads' outputs before W_O (`hook_z`).
- Input patching overwrites the heads' query, key and/or value vectors (`hook_q`, `hook_k`,
  `hook_v`, before rotary) at the group's position only, as the paper does. A query at position
  p only changes what position p reads. A key or value at p is read by that head at every
  position >= p: for groups at the last token (A, B) that is the last token alone, for the
  position detector (C, query label) it is the query label and every later token. Keys and
  values at other positions stay the base model's.
- With grouped-query attention a key/value head serves several query heads, so patching one
  query head's key or value is not defined; that raises `SetupError`.

The source activations of a chunk are read once, in one forward pass. Each patched base run
is exact but only recomputes what the patch can change: layers from the first patched one,
positions from the first patched one (`metrics.resume`, from one clean base run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .circuit import GROUP_LETTERS, GROUP_POSITIONS, Circuit, CircuitError, Head
from .data import Batch
from .hooks import Hook, patch_hooks, store_hooks
from .metrics import clean_run, n_correct, resume
from .models import SetupError

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
PATCH_TITLES = {"z": "outputs (z)", "q": "queries", "k": "keys", "v": "values", "qk": "queries + keys",
                "qkv": "queries + keys + values"}

# The paper's head sets: per group, the DCM desideratum whose selected heads are patched
# (None: the whole group), plus the full circuit.
SET_DESIDERATA: dict[str, str | None] = {
    "value_fetcher": "object_value",
    "pos_transmitter": "positional",
    "pos_detector": "positional",
    "struct_reader": None,
}
FULL = "full"
SET_ORDER = ("D", "C", "B", "A", FULL)  # the paper's bar order

Site = tuple[str, Hashable]  # (activation kind, position key)
Masks = dict[Site, Bool[Tensor, "layer head"]]


# ---------------------------------------------------------------------------------------------
# Checks


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


# ---------------------------------------------------------------------------------------------
# Head sets


def _dcm_section(dcm_result: Mapping) -> Mapping:
    """The part of dcm.json about the model's own circuit (layout: `stages/dcm.py`)."""
    try:
        section = dcm_result["own_circuit"]
        if not isinstance(section["groups"], Mapping):
            raise TypeError
    except (KeyError, TypeError):
        raise CircuitError("dcm.json has no 'own_circuit' section with 'groups'") from None
    return section


def dcm_heads(dcm_result: Mapping, group: str, desideratum: str) -> list[Head]:
    """The heads DCM selected in `group` of the model's own circuit for `desideratum`
    (dcm["own_circuit"]["groups"][group][desideratum]["heads"]); [] for a group the circuit
    does not have. The one place that reads head selections from dcm.json."""
    by_group = _dcm_section(dcm_result)["groups"]
    if group not in by_group:
        return []
    try:
        heads = by_group[group][desideratum]["heads"]
        return [(int(layer), int(head)) for layer, head in heads]
    except (KeyError, TypeError, ValueError):
        raise CircuitError(f"dcm.json has no valid {desideratum} heads for group {group!r}") from None


def check_dcm_matches(circuit: Circuit, dcm_result: Mapping) -> None:
    """CircuitError when dcm.json was computed on another version of the circuit (stale)."""
    recorded = _dcm_section(dcm_result).get("group_heads")
    if recorded is None:
        return
    try:
        recorded = {g: sorted((int(layer), int(head)) for layer, head in hs) for g, hs in recorded.items()}
    except (AttributeError, TypeError, ValueError):
        raise CircuitError("dcm.json 'group_heads' must map groups to [layer, head] pairs") from None
    if recorded != {g: sorted(hs) for g, hs in circuit.groups.items()}:
        raise CircuitError("dcm.json was computed on a different circuit than circuit.json; rerun the dcm stage")


def cmap_head_sets(circuit: Circuit, dcm_result: Mapping | None) -> dict[str, dict[str, list[Head]]]:
    """The paper's sets, each as group -> heads: A = DCM object-value heads of the value
    fetchers, B / C = DCM positional heads of the position transmitters / detectors, D = the
    whole structure-reader group, and the full circuit. A group DCM selected nothing for gets
    an empty set (reported as such, not patched); so do A-C without a DCM result (None)."""
    if dcm_result is not None:
        check_dcm_matches(circuit, dcm_result)
    sets: dict[str, dict[str, list[Head]]] = {}
    for group, desideratum in SET_DESIDERATA.items():
        if desideratum is None:
            heads = list(circuit.groups.get(group, []))
        elif dcm_result is None:
            heads = []
        else:
            heads = dcm_heads(dcm_result, group, desideratum)
        sets[GROUP_LETTERS[group]] = {group: heads}
    sets[FULL] = {g: list(h) for g, h in circuit.groups.items()}
    return sets


# ---------------------------------------------------------------------------------------------
# Patching


def site_masks(
    groups: Mapping[str, Iterable[Head]],
    positions: Mapping[str, str],
    patch: str,
    n_layers: int,
    n_heads: int,
) -> Masks:
    """(kind, position name) -> heads to overwrite there: each group's heads at its position,
    for every activation the patch kind overwrites; sites with no head are left out."""
    circuit = Circuit({g: list(h) for g, h in groups.items()}, dict(positions))
    circuit.validate(n_layers, n_heads)
    masks: Masks = {}
    for group in circuit.groups:
        m = circuit.mask(group, n_layers, n_heads)
        if not m.any():
            continue
        for kind in PATCHES[patch]:
            key = (kind, positions[group])
            masks[key] = masks[key] | m if key in masks else m
    return masks


def first_layer(masks: Masks) -> int:
    """The lowest layer any site patches: layers below it are untouched by the patch."""
    return min(int(m.any(1).nonzero()[0]) for m in masks.values())


@torch.no_grad()
def read_source(
    source: HookedTransformer,
    input_ids: Int[Tensor, "batch seq"],
    sites: Iterable[Site],
    positions: Mapping[Hashable, Int[Tensor, " batch"]],
) -> tuple[Float[Tensor, "batch seq vocab"], dict[Site, dict[int, Float[Tensor, "batch head d"]]]]:
    """One source forward pass: its logits and, per site, every layer's activation there."""
    values: dict[Site, dict[int, Tensor]] = {}
    hooks: list[Hook] = []
    for kind, key in sites:
        values[(kind, key)] = {}
        hooks += store_hooks(kind, positions[key], range(source.cfg.n_layers), values[(kind, key)])
    logits = source.run_with_hooks(input_ids.to(source.cfg.device), fwd_hooks=hooks)
    return logits, values


def write_hooks(
    values: Mapping[Site, dict[int, Tensor]],
    positions: Mapping[Hashable, Int[Tensor, " batch"]],
    masks: Masks,
) -> list[Hook]:
    """Hooks overwriting the masked heads at each site with the source's values."""
    hooks: list[Hook] = []
    for (kind, key), mask in masks.items():
        hooks += patch_hooks(kind, values[(kind, key)], positions[key], mask)
    return hooks


@torch.no_grad()
def cross_model_logits(
    base: HookedTransformer,
    source: HookedTransformer,
    input_ids: Int[Tensor, "batch seq"],
    positions: Mapping[Hashable, Int[Tensor, " batch"]],
    masks: Masks,
) -> Float[Tensor, "batch seq vocab"]:
    """Base-model logits with the masked heads at each site overwritten by the source model's
    activations on the same input (the primitive that `cmap_accuracy` batches)."""
    check_geometry(base, source)
    for kind, _ in masks:
        check_patch(base, kind)
    _, values = read_source(source, input_ids, masks.keys(), positions)
    return base.run_with_hooks(input_ids.to(base.cfg.device), fwd_hooks=write_hooks(values, positions, masks))


@dataclass(frozen=True)
class Variant:
    """One bar: a head set (group -> heads) patched with one patch kind."""

    set_name: str
    patch: str
    groups: dict[str, list[Head]]

    @property
    def n_heads(self) -> int:
        return sum(len(h) for h in self.groups.values())


def variants(
    head_sets: Mapping[str, dict[str, list[Head]]],
    output_sets: Iterable[str] | None = None,
    input_sets: Iterable[str] = ("A",),
    input_patches: Iterable[str] = INPUT_PATCHES,
) -> list[Variant]:
    """Output (`z`) patching for `output_sets` (default: every set) and each input patch kind
    for `input_sets` (the paper shows input patching for set A)."""
    output_sets = list(head_sets) if output_sets is None else list(output_sets)
    out = []
    for name in [*output_sets, *input_sets]:
        if name not in head_sets:
            raise CircuitError(f"unknown head set {name!r}; known: {', '.join(head_sets)}")
    out += [Variant(name, "z", head_sets[name]) for name in output_sets]
    out += [Variant(name, p, head_sets[name]) for name in input_sets for p in input_patches]
    return out


@dataclass
class CmapResult:
    """Accuracies on one prompt set: the base and source models alone, and each variant
    (NaN for a variant with no heads)."""

    base: float
    source: float
    variants: list[tuple[Variant, float]]
    n: int



@torch.no_grad()
def cmap_accuracy(
    base: HookedTransformer,
    source: HookedTransformer,
    batch: Batch,
    variant_list: list[Variant],
    positions: Mapping[str, str] = GROUP_POSITIONS,
    batch_size: int = 32,
    progress: bool = True,
) -> CmapResult:
    """Base accuracy, source accuracy, and base accuracy with each variant's heads patched from
    the source, all on `batch`."""
    check_geometry(base, source)
    n_layers, n_heads = base.cfg.n_layers, base.cfg.n_heads
    masks = []
    for v in variant_list:
        check_patch(base, v.patch)
        masks.append(site_masks(v.groups, positions, v.patch, n_layers, n_heads))
    sites = sorted({site for m in masks for site in m})
    hits = [0] * len(variant_list)
    base_hits = source_hits = 0
    starts = range(0, len(batch), batch_size)
    for start in tqdm(starts, desc="cmap", disable=not progress, leave=False):
        chunk = batch[start : start + batch_size].to(base.cfg.device)
        where = {name: chunk.position(name) for name in set(positions.values())}
        source_logits, values = read_source(source, chunk.input_ids, sites, where)
        run = clean_run(base, chunk.input_ids)
        source_hits += n_correct(source_logits, chunk.last, chunk.answer)
        base_hits += n_correct(run.logits, chunk.last, chunk.answer)
        for i, m in enumerate(masks):
            if not m:
                continue
            first = min(int(where[key].min()) for _, key in m)  # first position the patch changes
            shifted = {key: p - first for key, p in where.items()}
            logits = resume(base, run, first_layer(m), first, write_hooks(values, shifted, m))
            hits[i] += n_correct(logits, chunk.last - first, chunk.answer)
    n = len(batch)
    return CmapResult(
        base=base_hits / n,
        source=source_hits / n,
        variants=[(v, h / n if m else math.nan) for v, h, m in zip(variant_list, hits, masks)],
        n=n,
    )


def result_rows(result: CmapResult, source_name: str, base_name: str) -> list[dict]:
    """CSV rows: one per variant, with both baselines on every row; an empty set says so."""
    return [
        {
            "source": source_name,
            "base": base_name,
            "set": v.set_name,
            "patch": v.patch,
            "n_heads": v.n_heads,
            "accuracy": None if math.isnan(acc) else round(acc, 4),
            "base_accuracy": round(result.base, 4),
            "source_accuracy": round(result.source, 4),
            "n": result.n,
            "note": "no heads selected; not patched" if v.n_heads == 0 else "",
        }
        for v, acc in result.variants
    ]


# ---------------------------------------------------------------------------------------------
# Figure 3


def _pairs(frame) -> list[tuple[str, str, float, float]]:
    """(source, base, base accuracy, source accuracy) of each pair in `frame`, in order."""
    first = frame.drop_duplicates(["source", "base"])
    return list(zip(first["source"], first["base"], first["base_accuracy"], first["source_accuracy"]))


def _baselines(fig, x: list, base_acc: float, source_acc: float, col: int) -> None:
    """Dashed horizontal lines across the bars: base (red) and fine-tuned (green) accuracy."""
    import plotly.graph_objects as go

    for name, value, color in (("base model", base_acc, "#e45756"), ("fine-tuned model", source_acc, "#54a24b")):
        fig.add_trace(
            go.Scatter(
                x=x, y=[value] * len(x), mode="lines", name=f"{name} alone", legendgroup=name,
                line=dict(dash="dash", color=color), showlegend=col == 1,
                hovertemplate=f"{name}: {value:.2f}<extra></extra>",
            ),
            row=1, col=col,
        )


def _panels(pairs, title: str):
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=max(len(pairs), 1), shared_yaxes=True,
        subplot_titles=[f"{s} -> {b}<br><sup>base {ba:.2f}, fine-tuned {sa:.2f}</sup>" for s, b, ba, sa in pairs],
    )
    fig.update_yaxes(range=[0, 1.08], title_text="base-model accuracy", row=1, col=1)
    fig.update_layout(
        title=title, template="plotly_white", height=460, width=120 + 400 * max(len(pairs), 1),
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


def cmap_figure(frame, patch: str = "z"):
    """Figure 3: per source -> base pair, one bar per head set (sizes in brackets) patched
    with `patch`, and the two models' own accuracies as dashed lines; an empty set shows
    'none' and no bar."""
    import plotly.graph_objects as go

    frame = frame[frame["patch"] == patch]
    pairs = _pairs(frame)
    fig = _panels(pairs, f"CMAP: the fine-tuned model's head {PATCH_TITLES[patch]} patched into the base model")
    for col, (source, base, base_acc, source_acc) in enumerate(pairs, start=1):
        rows = frame[(frame["source"] == source) & (frame["base"] == base)].set_index("set")
        rows = rows.reindex([s for s in SET_ORDER if s in rows.index])
        x = [f"{s} ({int(n)})" for s, n in zip(rows.index, rows["n_heads"])]
        fig.add_trace(
            go.Bar(
                x=x, y=rows["accuracy"], marker_color="#4c78a8", name="patched base model",
                showlegend=col == 1, legendgroup="patched",
                text=["none" if math.isnan(a) else f"{a:.2f}" for a in rows["accuracy"].astype(float)],
                textposition="outside",
            ),
            row=1, col=col,
        )
        _baselines(fig, x, base_acc, source_acc, col)
    return fig


def input_patching_figure(frame):
    """Input patching: per pair, bars per patch kind (q, k, v, qk, qkv, and output z beside
    them), one colour per head set that was input-patched."""
    import plotly.graph_objects as go

    input_sets = list(dict.fromkeys(frame.loc[frame["patch"].isin(INPUT_PATCHES), "set"]))
    frame = frame[frame["set"].isin(input_sets)]
    pairs = _pairs(frame)
    fig = _panels(pairs, "CMAP input patching: q / k / v of the fine-tuned model's heads in the base model")
    order = [*INPUT_PATCHES, "z"]
    colors = dict(zip(SET_ORDER[::-1], ("#4c78a8", "#f58518", "#72b7b2", "#b279a2", "#9d755d")))
    for col, (source, base, base_acc, source_acc) in enumerate(pairs, start=1):
        rows = frame[(frame["source"] == source) & (frame["base"] == base)]
        for name in input_sets:
            r = rows[rows["set"] == name].set_index("patch").reindex(order)
            fig.add_trace(
                go.Bar(
                    x=order, y=r["accuracy"], name=f"set {name} ({int(r['n_heads'].fillna(0).max())} heads)",
                    marker_color=colors[name], legendgroup=name, showlegend=col == 1,
                    text=["none" if math.isnan(a) else f"{a:.2f}" for a in r["accuracy"].astype(float)],
                    textposition="outside",
                ),
                row=1, col=col,
            )
        _baselines(fig, order, base_acc, source_acc, col)
    fig.update_layout(barmode="group")
    return fig
