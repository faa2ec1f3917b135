"""Where does a mechanism live? A sweep over positions, for prompts whose positions line up.

For each position spec p (an absolute token of a shared layout, or a position relative to a
named anchor such as "labels+1"), and each layer l, the *layer sweep* patches every head's
output (`hook_z`) at p in layer l from the corrupt prompt into the clean run and reads the
metric: the total effect of what layer l writes at p. At the positions it marks (the largest
effects), less those whose effect a smaller marked position set carries (`smallest`), two head
sweeps follow:

- `heads`: the same patch, one head at a time (activation patching);
- `paths`: path patching's freeze semantics (`path_patching.path_patch`) with the sender at p
  and every later head's q, k and v at p as receivers: the effect of what a head writes at p
  on the heads that read from p, with every other head frozen.

Scores are metric(patched) - metric(clean), divided by metric(clean) when `relative` (the
default metric, the mean answer probability, is relative as in path patching).

`method="attribution"` screens first: every (position, layer) and (position, head) to first
order (`attribution.sweep_attribution`: one clean forward and backward, one corrupt forward),
the same marking rule on those estimates proposes positions, and the exact sweep above runs at
the proposed positions only; what it marks there is what the result marks. A position the
estimate misses is not swept exactly (`Sweep.estimate` keeps every position's estimate).

Cost: patching layer l at p recomputes layers >= l at positions >= p, restarted from the clean
run (`restart.run_from`). All layers of a position share one pass, and so do all heads of all
layers: the rows of layer l's patch join the pass at layer l (one row per variant and prompt).
That is the least an exact sweep computes: over S positions of a shared layout and L layers,
the layer sweep alone costs about (L + 1)(S + 1) / 4 plain forwards (at 32 layers and 54
tokens, ~440), and each position's head sweep about L H / 2 x its share of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from et_circuits.core.distributed import sharded_map
from et_circuits.core.errors import DataError
from et_circuits.core.hooks import last_rows_hook, per_head_values
from et_circuits.core.metrics import Metric, answer_prob, metric_total, score_of
from et_circuits.core.prepared import PreparedRuns, prepare_runs
from et_circuits.core.prompts import LAST, PromptSet, Spec, spec_text
from et_circuits.core.restart import earliest, run_from, same_start_chunks, tile
from et_circuits.core.serial import frame, spec_from_json, table_from_json
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Receiver

from .attribution import sweep_attribution
from .path_patching import path_patch

SWEEP_METHODS = ("exact", "attribution")


@dataclass(frozen=True, eq=False)
class Sweep:
    """A sweep's scores: per position, per layer (`layers[i, l]` for `positions[i]`); the
    `marked` positions; and at the smallest marked ones (the keys of `heads` and `paths`), per
    head, by activation patching (`heads`) and by path patching through every later head's
    inputs there (`paths`). `tokens`: the first prompt's token(s) at each position (for
    figures and reprs). A screened sweep (`method` "attribution") holds the exact sweep at the
    proposed positions, and the attribution estimate of every swept position's layers
    (`estimate[i]` for `swept[i]`)."""

    positions: list[Spec]
    layers: Float[Tensor, "position layer"]
    marked: list[Spec] = field(default_factory=list)
    heads: dict[Spec, Float[Tensor, "layer head"]] = field(default_factory=dict)
    paths: dict[Spec, Float[Tensor, "layer head"]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    method: str = "exact"
    swept: list[Spec] = field(default_factory=list)
    estimate: Float[Tensor, "position layer"] | None = None

    def to_json(self) -> dict:
        """As JSON (what `figures.sweep_heatmap` and the report read): scores rounded to 6
        decimals, a rounded -0.0 written as 0.0."""

        def table(t):
            return [[round(x, 6) + 0.0 for x in row] for row in t.tolist()]

        return {
            "positions": list(map(_as_json, self.positions)),
            "tokens": self.tokens,
            "layers": table(self.layers),
            "marked": self.marked,
            "heads": {spec_text(p): table(t) for p, t in self.heads.items()},
            "paths": {spec_text(p): table(t) for p, t in self.paths.items()},
            "method": self.method,
            **(
                {}
                if self.estimate is None
                else {"swept": list(map(_as_json, self.swept)), "estimate": table(self.estimate)}
            ),
        }

    @classmethod
    def from_json(cls, d: dict) -> Sweep:
        """A sweep from `to_json` (its scores as rounded there)."""
        positions = [spec_from_json(p) for p in d["positions"]]
        by_text = {spec_text(p): p for p in positions}
        return cls(
            positions,
            table_from_json(d["layers"]),
            [spec_from_json(p) for p in d["marked"]],
            {by_text[p]: table_from_json(t) for p, t in d["heads"].items()},
            {by_text[p]: table_from_json(t) for p, t in d["paths"].items()},
            list(d.get("tokens", [])),
            d.get("method", "exact"),
            [spec_from_json(p) for p in d.get("swept", [])],
            table_from_json(d["estimate"]) if "estimate" in d else None,
        )

    def to_frame(self):
        """One row per (position, layer): position, its token, layer, score, marked."""
        tokens = self.tokens or [""] * len(self.positions)
        rows = [
            {"position": spec_text(p), "token": t, "layer": layer, "score": score, "marked": p in self.marked}
            for p, t, scores in zip(self.positions, tokens, self.layers.tolist())
            for layer, score in enumerate(scores)
        ]
        return frame(rows, ["position", "token", "layer", "score", "marked"])

    def __repr__(self) -> str:
        token = dict(zip(map(spec_text, self.positions), self.tokens))
        marked = ", ".join(f"{spec_text(p)} ({token.get(spec_text(p), '')})" for p in self.marked) or "none"
        detailed = ", ".join(map(spec_text, self.heads)) or "none"
        return (
            f"Sweep({len(self.positions)} positions x {self.layers.shape[1]} layers; marked: {marked}; "
            f"head sweeps at: {detailed})"
        )


def absolute_positions(prompts: PromptSet) -> tuple[PromptSet, list[str]]:
    """The prompts with a position `t<i>` for every token index i, and those names; DataError
    unless every prompt has the same length (a shared layout)."""
    if not bool((prompts.attention_mask == 1).all()):
        raise DataError("an absolute-position sweep needs prompts of one length; give anchored positions instead")
    n, seq = prompts.input_ids.shape
    names = [f"t{i}" for i in range(seq)]
    return prompts.replace(positions={name: torch.full((n,), i) for i, name in enumerate(names)}), names


PatchTarget = tuple[int, int | None]  # (layer, head): one head of a layer, or all of them (None)


@torch.no_grad()
def _patched_metrics(
    model: HookedTransformer,
    runs: PreparedRuns,
    clean: PromptSet,
    spec: Spec,
    variants: Sequence[PatchTarget],
    metric: Metric,
    settings: RunSettings,
) -> tuple[Float[Tensor, " variants"], float]:
    """n x metric of each variant's patched run, where a variant (layer, head) gives that head
    (all of the layer's heads when head is None) at `spec` its corrupt value; and n x the clean
    metric. All variants share one pass per chunk of prompts: each variant's rows join the
    pass at its layer (`run_from`'s `joining`)."""
    order = sorted(range(len(variants)), key=lambda i: variants[i][0])  # rows join layer by layer
    by_layer: dict[int, list[int | None]] = {}
    for i in order:
        by_layer.setdefault(variants[i][0], []).append(variants[i][1])
    first = min(by_layer)
    n_heads, device = model.cfg.n_heads, model.cfg.device
    sorted_total = torch.zeros(len(variants), dtype=torch.float64)
    total_clean = 0.0
    rows = max(1, settings.max_rows // len(variants))
    for index in same_start_chunks(earliest(clean.position_set(spec)), rows):
        chunk, taken = clean[index].to(device), runs.take(index, model, [spec])
        at, n = chunk.position_set(spec), len(index)
        start, last = int(earliest(at).min()), chunk.position(LAST)
        shifted = torch.where(at >= 0, at - start, at)  # the spec's slots in suffix coordinates
        joining, hooks = {}, []
        for layer, heads in by_layer.items():
            clean_z, corrupt_z = taken.clean_at["z"][spec][layer], taken.corrupt_z[spec][layer]
            values = tile(clean_z, len(heads)).view(len(heads), n, at.shape[1], n_heads, -1)
            for r, head in enumerate(heads):
                if head is None:
                    values[r] = corrupt_z
                else:
                    values[r, :, :, head] = corrupt_z[:, :, head]
            values = values.view(len(heads) * n, at.shape[1], n_heads, -1)
            hooks.append(last_rows_hook("z", layer, tile(shifted, len(heads)), values))
            joining[layer] = tile(taken.run.resid[layer][:, start:], len(heads))
        prefix = taken.run.restrict(first, start)
        logits = run_from(
            model,
            joining.pop(first),
            first,
            prefix.keys,
            prefix.values,
            hooks,
            read_at=tile(last - start, len(variants)),
            joining=joining,
        ).view(len(variants), n, -1)
        for r in range(len(variants)):
            sorted_total[r] += metric_total(metric, logits[r], chunk)
        total_clean += metric_total(metric, taken.last_logits, chunk)
    total = torch.empty_like(sorted_total)
    total[torch.tensor(order)] = sorted_total
    return total, total_clean


def sweep(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    positions: Sequence[Spec] | None = None,
    *,
    metric: Metric | None = None,
    relative: bool | None = None,
    mark: float = 0.1,
    method: str = "exact",
    settings: RunSettings = QUIET,
) -> Sweep:
    """The layer sweep over `positions` (default: every token of prompts that share one
    layout); the marked positions, whose largest |layer score| is at least `mark` times the
    largest of all; then both head sweeps at the marked positions without redundant ones
    (`smallest`: a position set is left out when one of its subsets carries its effect). See the
    module docstring. `method` "attribution": screen the positions first (module docstring)."""
    if not 0 < mark <= 1:
        raise DataError(f"mark must be in (0, 1], got {mark}")
    if method not in SWEEP_METHODS:
        raise DataError(f"unknown sweep method {method!r}; expected one of {SWEEP_METHODS}")
    relative = (metric is None) if relative is None else relative
    metric = answer_prob if metric is None else metric
    if positions is None:
        clean, positions = absolute_positions(clean)
        corrupt = corrupt.replace(positions={p: clean.positions[p] for p in positions})
    positions = list(positions)
    if not positions:
        raise DataError("a position sweep needs at least one position")
    n_layers, n_heads, n = model.cfg.n_layers, model.cfg.n_heads, len(clean)
    if method == "attribution":
        return _screened(model, clean, corrupt, positions, metric, relative, mark, settings)
    runs = prepare_runs(model, clean, corrupt, positions, settings)

    def scored(variants: list[PatchTarget], what: str, specs: list[Spec]) -> list[Tensor]:
        """Each spec's scores of `variants`, one spec per rank under torchrun."""
        bar = tqdm(total=len(specs), desc=f"position sweep: {what}", disable=not settings.progress, leave=False)

        def one(spec: Spec) -> Tensor:
            return score_of(*_patched_metrics(model, runs, clean, spec, variants, metric, settings), n, relative)

        out = sharded_map(one, specs, lambda i, r: bar.update())
        bar.close()
        return out

    with per_head_values(model):
        layer_scores = torch.stack(scored([(layer, None) for layer in range(n_layers)], "layers", positions))
        strength = layer_scores.abs().amax(1)
        marked = [p for p, s in zip(positions, strength.tolist()) if s >= mark * float(strength.max()) and s > 0]
        detailed = smallest(Sweep(positions, layer_scores, marked), clean)
        every_head = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        heads = {spec: t.view(n_layers, n_heads) for spec, t in zip(detailed, scored(every_head, "heads", detailed))}
        paths: dict[Spec, Tensor] = {}
        for spec in tqdm(detailed, desc="position sweep: paths", disable=not settings.progress, leave=False):
            readers = [Receiver(l, h, kind, spec) for l in range(1, n_layers) for h in range(n_heads) for kind in "qkv"]
            paths[spec] = path_patch(
                model,
                clean,
                corrupt,
                spec,
                receivers=readers,
                metric=metric,
                relative=relative,
                settings=settings,
                runs=runs,
            ).scores
    return Sweep(positions, layer_scores, marked, heads, paths, _tokens_at(model, clean, positions))


def _screened(model, clean, corrupt, positions, metric, relative, mark, settings) -> Sweep:
    """Attribution for every position, the marking rule on it, the exact sweep at what it marks."""
    total, total_clean = sweep_attribution(model, clean, corrupt, positions, metric, settings.batch_size)
    estimate = total.sum(-1) / len(clean)  # a layer's patch moves all its heads: their sum, to first order
    if relative:
        estimate = estimate / (total_clean / len(clean))
    strength = estimate.abs().amax(1)
    proposed = [p for p, s in zip(positions, strength.tolist()) if s >= mark * float(strength.max()) and s > 0]
    if not proposed:
        raise DataError("attribution found no effect at any position")
    exact = sweep(model, clean, corrupt, proposed, metric=metric, relative=relative, mark=mark, settings=settings)
    return Sweep(
        exact.positions,
        exact.layers,
        exact.marked,
        exact.heads,
        exact.paths,
        exact.tokens,
        "attribution",
        list(positions),
        estimate.float(),
    )


def _as_json(spec: Spec):
    return spec if isinstance(spec, str) else list(spec)


def _tokens_at(model: HookedTransformer, prompts: PromptSet, positions: Sequence[Spec]) -> list[str]:
    """The first prompt's token(s) at each position (ids where the model has no tokenizer)."""
    ids = prompts.input_ids[0].tolist()
    tok = model.tokenizer
    words = tok.convert_ids_to_tokens(ids) if tok is not None else [str(t) for t in ids]
    return [" ".join(words[i] for i in prompts[:1].position_set(p)[0].tolist() if i >= 0) for p in positions]


def smallest(sweep: Sweep, prompts: PromptSet, *, keep: float = 0.9) -> list[Spec]:
    """The marked positions without redundant ones: a marked spec is dropped when another
    marked spec covers a subset of its positions in every prompt and keeps at least `keep` of
    its effect (e.g. a set "item+1", every item's next token, when "target+1", the one item's,
    carries the same effect)."""
    strength = dict(zip(map(_key, sweep.positions), sweep.layers.abs().amax(1).tolist()))
    sets = {_key(s): _as_sets(prompts.position_set(s)) for s in sweep.marked}

    def covered(big: Spec) -> bool:
        return any(
            other != big
            and all(a <= b for a, b in zip(sets[_key(other)], sets[_key(big)]))
            and sets[_key(other)] != sets[_key(big)]
            and strength[_key(other)] >= keep * strength[_key(big)]
            for other in sweep.marked
        )

    return [s for s in sweep.marked if not covered(s)]


def _key(spec: Spec):
    return spec if isinstance(spec, str) else tuple(spec)


def _as_sets(at: Tensor) -> list[frozenset[int]]:
    return [frozenset(int(p) for p in row if p >= 0) for row in at.tolist()]
