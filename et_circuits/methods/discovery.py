"""Circuit discovery by path patching, step after step (Wang et al. 2023): each `Step` names a
group, the position its senders are patched at, and the inputs through which they are scored on
an earlier step's heads. `find_circuit` runs the steps a task gives it; it has no default steps.

Screened discovery (`screen=N`): per step, attribution (`path_patch(method="attribution")`)
estimates every sender's score, the exact method scores only the N senders with the largest
|attribution|, and the group is chosen from those exact scores alone. Attribution proposes, the
exact method decides; what it can miss is a sender whose attribution ranks below N (attribution
is a first-order estimate, and can rank badly where attention is nonlinear).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.metrics import Metric
from et_circuits.core.prepared import prepare_runs
from et_circuits.core.prompts import PromptSet
from et_circuits.core.serial import frame, spec_from_json, spec_to_json
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Head, Receiver, Step

from .path_patching import PathPatching, path_patch, top_heads


def reachable(receivers: Sequence[Receiver], n_layers: int, n_heads: int) -> list[Head]:
    """The senders that can reach a receiver at all: heads below its layer (a sender's output
    enters the residual stream after its own layer's attention). Without receivers, every head."""
    top = max((r.layer for r in receivers), default=n_layers)
    return [(l, h) for l in range(min(top, n_layers)) for h in range(n_heads)]


def effective_top_k(top_k: Sequence[int], n_layers: int, n_heads: int, cap: float) -> tuple[int, ...]:
    """`top_k` capped to `cap` of all heads (at least 1), e.g. so that top-k numbers meant for
    1024 heads do not take most of a 16-head model."""
    if any(k <= 0 for k in top_k):
        raise CircuitError(f"top-k needs positive numbers, got {list(top_k)}")
    if not 0 < cap <= 1:
        raise CircuitError(f"top-k cap must be in (0, 1], got {cap}")
    limit = max(1, int(cap * n_layers * n_heads))
    return tuple(min(k, limit) for k in top_k)


# ---------------------------------------------------------------------------------------------
# Circuit discovery: steps of path patching, each step's receivers the previous step's top heads


ESTIMATE = "attribution"  # the path-patching method that only screens (never chooses a group)


@dataclass(frozen=True, eq=False)
class Screened:
    """One screened step: attribution for every sender (`estimate`) and the exact scores of the
    senders screened in (`exact`; NaN: not scored exactly)."""

    exact: PathPatching
    estimate: PathPatching

    @property
    def scored_exactly(self):
        """Boolean [layer, head]: the senders the exact method scored."""
        return ~self.exact.scores.isnan()


StepLookup = Callable[[Step, list[Receiver]], "PathPatching | Screened | None"]  # a step's earlier result, if any
StepDone = Callable[[Step, list[Receiver], "PathPatching | Screened", bool, float], None]  # (..., reused, seconds)


@dataclass(frozen=True, eq=False)
class FoundCircuit:
    """What `find_circuit` finds: the circuit (each group at its step's position), the steps
    and top-k that found it, every step's exact `PathPatching` by group, and the groups whose
    scores were reused from an earlier run rather than computed. Screened (`screen` = N): each
    step's attribution for every sender (`attribution`); `scores` then holds exact scores for
    the senders screened in only (NaN elsewhere), and the groups were chosen from those."""

    circuit: Circuit
    steps: tuple[Step, ...]
    top_k: tuple[int, ...]
    scores: dict[str, PathPatching]
    reused: tuple[str, ...] = ()
    attribution: dict[str, PathPatching] = field(default_factory=dict)
    screen: int | None = None

    def to_frame(self):
        """One row per (step, sender): group, layer, head, score, and whether the head is in the
        group."""
        rows = [
            {**row, "group": group, "chosen": (row["layer"], row["head"]) in set(self.circuit.groups[group])}
            for group, result in self.scores.items()
            for row in result.to_frame().to_dict("records")
        ]
        return frame(rows, ["group", "layer", "head", "score", "chosen"])

    def to_json(self) -> dict:
        return {
            "circuit": self.circuit.to_dict(),
            "steps": [[s.group, spec_to_json(s.position), s.receiver_kind, s.receivers_from] for s in self.steps],
            "top_k": list(self.top_k),
            "scores": {g: r.to_json() for g, r in self.scores.items()},
            "reused": list(self.reused),
            "screen": self.screen,
            "attribution": {g: r.to_json() for g, r in self.attribution.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> FoundCircuit:
        return cls(
            Circuit.from_dict(d["circuit"]),
            tuple(Step(g, spec_from_json(p), kind, source) for g, p, kind, source in d["steps"]),
            tuple(d["top_k"]),
            {g: PathPatching.from_json(r) for g, r in d["scores"].items()},
            tuple(d["reused"]),
            {g: PathPatching.from_json(r) for g, r in d.get("attribution", {}).items()},
            d.get("screen"),
        )

    def __repr__(self) -> str:
        reused = f"; reused: {', '.join(self.reused)}" if self.reused else ""
        screened = f"; screened, N={self.screen}" if self.screen is not None else ""
        return f"FoundCircuit({self.circuit!r}, top-k {list(self.top_k)}{screened}{reused})"


def step_receivers(step: Step, previous: Sequence[Head]) -> list[Receiver]:
    """The previous group's heads, receiving through each input kind of `step.receiver_kind`
    ("q", "v", or several, e.g. "kv") at the step's position."""
    if step.receiver_kind is None:
        return []
    return [Receiver(layer, head, kind, step.position) for kind in step.receiver_kind for layer, head in previous]


def screened_senders(estimate: PathPatching, n: int, among: Sequence[Head]) -> list[Head]:
    """The `n` senders of `among` with the largest |attribution| (ties: lower layer, then head)."""
    return top_heads(-estimate.scores.abs(), n, among=among)


def find_circuit(
    model: HookedTransformer,
    clean: PromptSet,
    corrupt: PromptSet,
    top_k: Sequence[int],
    steps: Sequence[Step],
    *,
    metric: Metric | None = None,
    relative: bool | None = None,
    method: str = "fast",
    screen: int | None = None,
    ig_steps: int = 1,
    settings: RunSettings = QUIET,
    finished: StepLookup | None = None,
    on_step: StepDone | None = None,
) -> FoundCircuit:
    """Path patching step after step (`path_patch` with `metric`, `relative`, `method`); each
    step's receivers are the heads an earlier step found (the step before's, unless
    `Step.receivers_from` names another), through the step's input kinds at its position
    (`step_receivers`). A group is its step's `top_k` heads among those that can reach a
    receiver (`reachable`), so it may hold fewer, or none; a step whose receivers are none
    scores no sender. Returns a `FoundCircuit`.

    `screen` = N: attribution (`ig_steps` gradient points) for every sender, then `method`
    (exact) for the N reachable senders with the largest |attribution| only; the group is the
    top-k of those exact scores (N must be >= every top-k). None (default): exact for all.

    `finished(step, receivers)` may return a step's earlier result (the step is then not
    recomputed); `on_step(step, receivers, result, reused, seconds)` is called after each step
    (a result is a `Screened` when screening).
    """
    if len(top_k) != len(steps):
        raise CircuitError(f"top-k needs {len(steps)} numbers (one per step), got {list(top_k)}")
    if method == ESTIMATE:
        raise CircuitError("attribution is an estimate and does not choose a group alone: use screen=N")
    if screen is not None and screen < max(top_k, default=0):
        raise CircuitError(f"screen={screen} must be at least every top-k ({max(top_k)})")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores: dict[str, PathPatching] = {}
    estimates: dict[str, PathPatching] = {}
    groups: dict[str, list[Head]] = {}
    reused_groups = []
    runs = None  # the clean and corrupt runs, shared by the steps computed
    for i, (step, k) in enumerate(zip(steps, top_k)):
        source = step.receivers_from or (steps[i - 1].group if i else None)
        receivers = step_receivers(step, groups.get(source, []))
        if step.receiver_kind is not None and source not in groups:
            raise CircuitError(f"step {step.group} receives from {source!r}, which no earlier step found")
        among = reachable(receivers, n_layers, n_heads)
        t0 = time.perf_counter()
        found = finished(step, receivers) if finished is not None else None
        reused = found is not None
        if not reused:
            if (method == "fast" or screen is not None) and runs is None:
                runs = prepare_runs(model, clean, corrupt, [s.position for s in steps], settings)
            senders = None if receivers or step.receiver_kind is None else []  # nothing to receive: no sender
            kwargs = dict(receivers=receivers or None, metric=metric, relative=relative, settings=settings, runs=runs)
            estimate = None
            if screen is not None:
                estimate = path_patch(
                    model, clean, corrupt, step.position, senders=senders, method=ESTIMATE, ig_steps=ig_steps, **kwargs
                )
                senders = screened_senders(estimate, screen, among if senders is None else [])
            found = path_patch(model, clean, corrupt, step.position, senders=senders, method=method, **kwargs)
            found = found if estimate is None else Screened(found, estimate)
        else:
            reused_groups.append(step.group)
        if on_step is not None:
            on_step(step, receivers, found, reused, time.perf_counter() - t0)
        if isinstance(found, Screened):
            estimates[step.group], found = found.estimate, found.exact
        scores[step.group] = found
        groups[step.group] = found.top(k, among=among)
    circuit = Circuit(groups, {s.group: s.position for s in steps})
    return FoundCircuit(circuit, tuple(steps), tuple(top_k), scores, tuple(reused_groups), estimates, screen)
