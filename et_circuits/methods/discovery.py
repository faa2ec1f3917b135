"""Circuit discovery by path patching, step after step (Wang et al. 2023): each `Step` names a
group, the position its senders are patched at, and the inputs through which they are scored on
an earlier step's heads. `find_circuit` runs the steps a task gives it; it has no default steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.metrics import Metric
from et_circuits.core.prepared import prepare_runs
from et_circuits.core.prompts import PromptSet, Spec
from et_circuits.core.settings import QUIET, RunSettings
from et_circuits.core.types import Head, Receiver

from .path_patching import path_patch, top_heads

TOP_K_CAP = 0.25  # at most this fraction of all heads per step (matters only for small models)


def reachable(receivers: Sequence[Receiver], n_layers: int, n_heads: int) -> list[Head]:
    """The senders that can reach a receiver at all: heads below its layer (a sender's output
    enters the residual stream after its own layer's attention). Without receivers, every head."""
    top = max((r.layer for r in receivers), default=n_layers)
    return [(l, h) for l in range(min(top, n_layers)) for h in range(n_heads)]


def effective_top_k(top_k: Sequence[int], n_layers: int, n_heads: int, cap: float = TOP_K_CAP) -> tuple[int, ...]:
    """`top_k` capped to `cap` of all heads (at least 1): the paper's 20/5/10/5 out of 1024 heads
    would take most of a 16-head model, so small models keep at most a quarter per step."""
    if any(k <= 0 for k in top_k):
        raise CircuitError(f"top-k needs positive numbers, got {list(top_k)}")
    if not 0 < cap <= 1:
        raise CircuitError(f"top-k cap must be in (0, 1], got {cap}")
    limit = max(1, int(cap * n_layers * n_heads))
    return tuple(min(k, limit) for k in top_k)


# ---------------------------------------------------------------------------------------------
# Circuit discovery: steps of path patching, each step's receivers the previous step's top heads


@dataclass(frozen=True)
class Step:
    """One discovery step: the group it finds, the sender position (a spec or a union of specs),
    and the input kinds ("q", "k", "v", or several: "kv") through which its senders are scored
    on the previous group's heads (None: on the metric)."""

    group: str
    position: Spec
    receiver_kind: str | None
    receivers_from: str | None = None  # the group whose heads receive (default: the step before's)


StepLookup = Callable[[Step, list[Receiver]], "Tensor | None"]
StepDone = Callable[[Step, list[Receiver], Tensor, bool, float], None]


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
    metric: Metric | None = None,
    relative: bool | None = None,
    method: str = "fast",
    settings: RunSettings = QUIET,
    finished: StepLookup | None = None,
    on_step: StepDone | None = None,
) -> tuple[Circuit, dict[str, Float[Tensor, "layer head"]]]:
    """Path patching step after step; each step's receivers are the heads an earlier step found
    (the step before's, unless `Step.receivers_from` names another), through the step's input
    kinds at its position (`step_receivers`). A group is its step's `top_k` heads among those
    that can reach a receiver (`reachable`), so it may hold fewer, or none; a step whose
    receivers are none scores no sender. Returns the circuit (each group at its step's
    position) and every step's scores.

    `finished(step, receivers)` may return a step's earlier scores (the step is then not
    recomputed); `on_step(step, receivers, scores, reused, seconds)` is called after each step.
    """
    if len(top_k) != len(steps):
        raise CircuitError(f"top-k needs {len(steps)} numbers (one per step), got {list(top_k)}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores: dict[str, Tensor] = {}
    groups: dict[str, list[Head]] = {}
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
                model, clean, corrupt, step.position, receivers or None, metric, relative, senders, method,
                settings, runs,
            )
        scores[step.group] = found
        if on_step is not None:
            on_step(step, receivers, found, reused, time.perf_counter() - t0)
        groups[step.group] = top_heads(found, k, reachable(receivers, n_layers, n_heads))
    circuit = Circuit(groups, {s.group: s.position for s in steps})
    return circuit, scores
