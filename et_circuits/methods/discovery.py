"""Circuit discovery by path patching, step after step (Wang et al. 2023): each `Step` names a
group, the position its senders are patched at, and the inputs through which they are scored on
an earlier step's heads. `find_circuit` runs the steps a task gives it; it has no default steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.metrics import Metric
from et_circuits.core.prepared import prepare_runs
from et_circuits.core.prompts import PromptSet
from et_circuits.core.serial import frame, spec_from_json, spec_to_json
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Head, Receiver, Step

from .path_patching import PathPatching, path_patch


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


StepLookup = Callable[[Step, list[Receiver]], "PathPatching | None"]  # a step's earlier result, if any
StepDone = Callable[[Step, list[Receiver], PathPatching, bool, float], None]  # (..., result, reused, seconds)


@dataclass(frozen=True, eq=False)
class FoundCircuit:
    """What `find_circuit` finds: the circuit (each group at its step's position), the steps
    and top-k that found it, every step's `PathPatching` by group, and the groups whose scores
    were reused from an earlier run rather than computed."""

    circuit: Circuit
    steps: tuple[Step, ...]
    top_k: tuple[int, ...]
    scores: dict[str, PathPatching]
    reused: tuple[str, ...] = ()

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
        }

    @classmethod
    def from_json(cls, d: dict) -> FoundCircuit:
        return cls(
            Circuit.from_dict(d["circuit"]),
            tuple(Step(g, spec_from_json(p), kind, source) for g, p, kind, source in d["steps"]),
            tuple(d["top_k"]),
            {g: PathPatching.from_json(r) for g, r in d["scores"].items()},
            tuple(d["reused"]),
        )

    def __repr__(self) -> str:
        reused = f"; reused: {', '.join(self.reused)}" if self.reused else ""
        return f"FoundCircuit({self.circuit!r}, top-k {list(self.top_k)}{reused})"


def step_receivers(step: Step, previous: Sequence[Head]) -> list[Receiver]:
    """The previous group's heads, receiving through each input kind of `step.receiver_kind`
    ("q", "v", or several, e.g. "kv") at the step's position."""
    if step.receiver_kind is None:
        return []
    return [Receiver(layer, head, kind, step.position) for kind in step.receiver_kind for layer, head in previous]


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

    `finished(step, receivers)` may return a step's earlier result (the step is then not
    recomputed); `on_step(step, receivers, result, reused, seconds)` is called after each step.
    """
    if len(top_k) != len(steps):
        raise CircuitError(f"top-k needs {len(steps)} numbers (one per step), got {list(top_k)}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores: dict[str, PathPatching] = {}
    groups: dict[str, list[Head]] = {}
    reused_groups = []
    runs = None  # the fast method's clean and corrupt runs, shared by the steps computed
    for i, (step, k) in enumerate(zip(steps, top_k)):
        source = step.receivers_from or (steps[i - 1].group if i else None)
        receivers = step_receivers(step, groups.get(source, []))
        if step.receiver_kind is not None and source not in groups:
            raise CircuitError(f"step {step.group} receives from {source!r}, which no earlier step found")
        t0 = time.perf_counter()
        found = finished(step, receivers) if finished is not None else None
        reused = found is not None
        if not reused:
            if method == "fast" and runs is None:
                runs = prepare_runs(model, clean, corrupt, [s.position for s in steps], settings)
            senders = None if receivers or step.receiver_kind is None else []  # nothing to receive: no sender
            found = path_patch(
                model,
                clean,
                corrupt,
                step.position,
                receivers=receivers or None,
                metric=metric,
                relative=relative,
                senders=senders,
                method=method,
                settings=settings,
                runs=runs,
            )
        else:
            reused_groups.append(step.group)
        scores[step.group] = found
        if on_step is not None:
            on_step(step, receivers, found, reused, time.perf_counter() - t0)
        groups[step.group] = found.top(k, among=reachable(receivers, n_layers, n_heads))
    circuit = Circuit(groups, {s.group: s.position for s in steps})
    return FoundCircuit(circuit, tuple(steps), tuple(top_k), scores, tuple(reused_groups))
