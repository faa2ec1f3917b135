"""The `Circuit` type (groups of heads, each acting at one position) with JSON I/O, and its
evaluation: mean ablation outside the circuit, random baselines, faithfulness, minimality,
overlap and completeness."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from .data import Batch
from .hooks import mean_activations, replace_hooks
from .metrics import accuracy
from .io import write_json

Head = tuple[int, int]

# The paper's groups in circuit order (A, B, C, D) and the position each acts at.
GROUP_POSITIONS: dict[str, str] = {
    "value_fetcher": "last",
    "pos_transmitter": "last",
    "pos_detector": "query_label",
    "struct_reader": "prev_query_label",
}
GROUP_LETTERS = dict(zip(GROUP_POSITIONS, "ABCD"))


class CircuitError(ValueError):
    """A circuit file or circuit is malformed or does not fit the model."""


@dataclass
class Circuit:
    """Group name -> list of (layer, head), plus the position each group acts at."""

    groups: dict[str, list[Head]]
    positions: dict[str, str] = field(default_factory=lambda: dict(GROUP_POSITIONS))

    def __post_init__(self) -> None:
        self.groups = {g: [tuple(map(int, h)) for h in heads] for g, heads in self.groups.items()}
        for g in self.groups:
            if g not in self.positions:
                raise CircuitError(f"group {g!r} has no position")
            if len(set(self.groups[g])) != len(self.groups[g]):
                raise CircuitError(f"group {g!r} lists a head twice")

    def __len__(self) -> int:
        return sum(len(h) for h in self.groups.values())

    def validate(self, n_layers: int, n_heads: int) -> "Circuit":
        """Raise CircuitError if any head is outside an n_layers x n_heads model."""
        for g, heads in self.groups.items():
            for layer, head in heads:
                if not (0 <= layer < n_layers and 0 <= head < n_heads):
                    raise CircuitError(
                        f"head L{layer}H{head} of group {g!r} is outside the model "
                        f"({n_layers} layers x {n_heads} heads)"
                    )
        return self

    def mask(self, group: str, n_layers: int, n_heads: int) -> Bool[Tensor, "layer head"]:
        """Boolean (layer, head) mask of one group's heads."""
        m = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in self.groups.get(group, []):
            m[layer, head] = True
        return m

    def to_dict(self) -> dict:
        return {
            "groups": {g: [list(h) for h in heads] for g, heads in self.groups.items()},
            "positions": dict(self.positions),
        }

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Circuit":
        """Our format ({"groups", "positions"}) or the authors' ({group: [[l, h], ...]})."""
        if not isinstance(d, dict):
            raise CircuitError("a circuit is a JSON object")
        if "groups" in d:
            groups, positions = d["groups"], d.get("positions", GROUP_POSITIONS)
        else:
            groups, positions = d, GROUP_POSITIONS
        if not isinstance(groups, dict) or not isinstance(positions, dict):
            raise CircuitError("circuit 'groups' and 'positions' must be objects")
        for g, heads in groups.items():
            ok = isinstance(heads, list) and all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, int) for x in h)
                for h in heads
            )
            if not ok:
                raise CircuitError(f"group {g!r} must be a list of [layer, head] integer pairs")
            if g not in positions:
                raise CircuitError(f"unknown group {g!r}; known: {', '.join(GROUP_POSITIONS)}")
        return cls({g: [tuple(h) for h in heads] for g, heads in groups.items()}, dict(positions))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CircuitError(f"no circuit file at {path}") from None
        except json.JSONDecodeError as e:
            raise CircuitError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Evaluation by mean ablation


def keep_mask(
    circuit: Circuit, batch: Batch, n_layers: int, n_heads: int
) -> Bool[Tensor, "layer batch pos head"]:
    """True where a head keeps its own activation: a circuit group's heads at that group's
    position. Everything else is mean-ablated."""
    keep = torch.zeros(n_layers, len(batch), batch.input_ids.shape[1], n_heads, dtype=torch.bool)
    rows = torch.arange(len(batch))
    for g, name in circuit.positions.items():
        if g not in circuit.groups:
            continue
        m = circuit.mask(g, n_layers, n_heads)  # layer head
        pos = batch.position(name)
        keep[:, rows, pos, :] |= m[:, None, :]
    return keep


def circuit_accuracy(
    model: HookedTransformer,
    circuit: Circuit,
    batch: Batch,
    means: Float[Tensor, "layer pos head d"],
    batch_size: int = 32,
    ablate_circuit: bool = False,
) -> float:
    """Accuracy with every head outside the circuit (or off its group's position) replaced by
    its position-wise mean over the reference set. With `ablate_circuit`, the complement: only
    the circuit's heads at their groups' positions are mean-ablated (the full model minus K)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    circuit.validate(n_layers, n_heads)

    def hooks_for(chunk: Batch):
        keep = keep_mask(circuit, chunk.to("cpu"), n_layers, n_heads)
        keep = ~keep if ablate_circuit else keep
        return replace_hooks("z", means.to(model.cfg.device), keep.to(model.cfg.device))

    return accuracy(model, batch, hooks_for, batch_size, progress=False)


def reference_means(model: HookedTransformer, reference: Batch, batch_size: int = 32):
    """Position-wise mean of hook_z over the reference prompts (same length as the evaluated ones)."""
    return mean_activations(model, reference.input_ids, "z", batch_size)


def random_circuit(circuit: Circuit, n_layers: int, n_heads: int, rng: random.Random) -> Circuit:
    """A circuit with the same group sizes and positions, heads drawn uniformly at random."""
    all_heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    return Circuit({g: rng.sample(all_heads, len(hs)) for g, hs in circuit.groups.items()}, dict(circuit.positions))


@dataclass
class Evaluation:
    full: float
    circuit: float
    random: float
    faithfulness: float

    def as_row(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


def evaluate(
    model: HookedTransformer,
    circuit: Circuit,
    batch: Batch,
    reference: Batch,
    n_random: int = 10,
    seed: int = 0,
    batch_size: int = 32,
) -> Evaluation:
    """Table 1's columns for one model: full accuracy, circuit accuracy, mean random-circuit
    accuracy over `n_random` draws, and faithfulness = circuit / full."""
    means = reference_means(model, reference, batch_size)
    full = accuracy(model, batch, batch_size=batch_size, progress=False)
    circ = circuit_accuracy(model, circuit, batch, means, batch_size)
    rng = random.Random(seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    rand = [
        circuit_accuracy(model, random_circuit(circuit, n_layers, n_heads, rng), batch, means, batch_size)
        for _ in range(n_random)
    ]
    rand_mean = sum(rand) / len(rand) if rand else float("nan")
    return Evaluation(full, circ, rand_mean, circ / full if full else float("nan"))


# ---------------------------------------------------------------------------------------------
# Overlap


def overlap(base: Circuit, other: Circuit) -> dict[str, tuple[int, int]]:
    """Per group: (heads of `base` also in `other`'s same group, size of `base`'s group)."""
    return {
        g: (len(set(heads) & set(other.groups.get(g, []))), len(heads))
        for g, heads in base.groups.items()
    }


def without(circuit: Circuit, heads: Iterable[tuple[str, Head]]) -> Circuit:
    """A copy of `circuit` without the given (group, head) entries."""
    drop = set(heads)
    return Circuit(
        {g: [h for h in hs if (g, h) not in drop] for g, hs in circuit.groups.items()},
        dict(circuit.positions),
    )
