"""The `Circuit` type: named groups of heads, each acting at one or more positions of the
prompts, with JSON read/write.

Positions are position specs of a PromptSet ("last", "subject", "items+1", ...); every
group names its own, and a circuit knows no task. The JSON format is
{"groups": {group: [[layer, head], ...]}, "positions": {group: spec or [spec, ...]}}. (A task
whose published circuits have no positions reads them in its own module.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool
from torch import Tensor

from .errors import CircuitError
from .io import write_json
from .prompts import parse_spec, spec_text
from .types import Head

Entry = tuple[str, Head]  # (group, head)


def _positions(group: str, value) -> tuple[str, ...]:
    specs = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not specs or not all(isinstance(s, str) for s in specs):
        raise CircuitError(f"group {group!r} needs a position or a list of positions, got {value!r}")
    for spec in specs:
        try:
            parse_spec(spec)
        except ValueError as e:
            raise CircuitError(f"group {group!r}: {e}") from None
    return specs


@dataclass(frozen=True, eq=True)
class Circuit:
    """Group name -> list of (layer, head), most important first, and the position spec(s)
    each group acts at (every group needs one)."""

    groups: dict[str, list[Head]]
    positions: dict[str, str | tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = {str(g): [tuple(map(int, h)) for h in heads] for g, heads in dict(self.groups).items()}
        positions = dict(self.positions)
        missing = [g for g in groups if g not in positions]
        if missing:
            raise CircuitError(f"group {missing[0]!r} has no position; give positions={{{missing[0]!r}: 'last', ...}}")
        for g in groups:
            specs = _positions(g, positions[g])
            positions[g] = positions[g] if isinstance(positions[g], str) else specs
            if len(set(groups[g])) != len(groups[g]):
                raise CircuitError(f"group {g!r} lists a head twice")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "positions", {g: positions[g] for g in groups})

    __hash__ = None  # a circuit is a value, but its groups are mutable lists

    def __len__(self) -> int:
        return sum(len(h) for h in self.groups.values())

    def __repr__(self) -> str:
        parts = [
            f"{g}: {' '.join(f'L{l}H{h}' for l, h in heads) or '(none)'} @ {spec_text(self.positions[g])}"
            for g, heads in self.groups.items()
        ]
        return f"Circuit({'; '.join(parts)})"

    def to_frame(self):
        """One row per (group, head): group, layer, head, rank in its group, positions."""
        import pandas as pd

        return pd.DataFrame(
            [
                {"group": g, "layer": layer, "head": head, "rank": i, "positions": spec_text(self.positions[g])}
                for g, heads in self.groups.items()
                for i, (layer, head) in enumerate(heads)
            ],
            columns=["group", "layer", "head", "rank", "positions"],
        )

    def positions_of(self, group: str) -> tuple[str, ...]:
        """The position specs a group acts at."""
        return _positions(group, self.positions[group])

    def entries(self) -> list[Entry]:
        """Every (group, head), in group order."""
        return [(g, h) for g, heads in self.groups.items() for h in heads]

    def validate(self, n_layers: int, n_heads: int) -> Circuit:
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
        return head_mask(self.groups.get(group, []), n_layers, n_heads)

    def keep_only(self, entries: Iterable[Entry]) -> Circuit:
        """A copy with only the given (group, head) entries (groups keep their positions)."""
        keep = set(entries)
        return Circuit({g: [h for h in hs if (g, h) in keep] for g, hs in self.groups.items()}, dict(self.positions))

    def without(self, entries: Iterable[Entry]) -> Circuit:
        """A copy without the given (group, head) entries."""
        drop = set(entries)
        return Circuit(
            {g: [h for h in hs if (g, h) not in drop] for g, hs in self.groups.items()}, dict(self.positions)
        )

    def to_dict(self) -> dict:
        return {
            "groups": {g: [list(h) for h in heads] for g, heads in self.groups.items()},
            "positions": {g: p if isinstance(p, str) else list(p) for g, p in self.positions.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping) -> Circuit:
        """A circuit from its JSON form ({"groups": ..., "positions": ...})."""
        if not isinstance(d, Mapping) or "groups" not in d:
            raise CircuitError('a circuit is a JSON object with "groups" and "positions"')
        groups, positions = d["groups"], d.get("positions", {})
        if not isinstance(groups, Mapping) or not isinstance(positions, Mapping):
            raise CircuitError("circuit 'groups' and 'positions' must be objects")
        return cls(head_lists(groups), {g: p if isinstance(p, str) else tuple(p) for g, p in positions.items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """A circuit from a JSON file (CircuitError naming a missing or malformed file)."""
        return cls.from_dict(read_circuit_json(path))


def head_lists(groups: Mapping) -> dict[str, list[Head]]:
    """{group: [[layer, head], ...]} checked and as tuples (CircuitError naming a bad group)."""
    for g, heads in groups.items():
        ok = isinstance(heads, list) and all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, int) for x in h) for h in heads
        )
        if not ok:
            raise CircuitError(f"group {g!r} must be a list of [layer, head] integer pairs")
    return {g: [tuple(h) for h in heads] for g, heads in groups.items()}


def read_circuit_json(path: str | os.PathLike):
    """The parsed JSON of a circuit file (CircuitError when it is missing or not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CircuitError(f"no circuit file at {path}") from None
    except json.JSONDecodeError as e:
        raise CircuitError(f"{path} is not valid JSON: {e}") from None


def head_mask(heads: Sequence[Head], n_layers: int, n_heads: int) -> Bool[Tensor, "layer head"]:
    """Boolean (layer, head) mask of `heads`; CircuitError for a head outside the model."""
    m = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise CircuitError(f"head L{layer}H{head} is outside the model ({n_layers} x {n_heads})")
        m[layer, head] = True
    return m


def overlap(base: Circuit, other: Circuit) -> dict[str, tuple[int, int]]:
    """Per group: (heads of `base` also in `other`'s same group, size of `base`'s group)."""
    return {g: (len(set(heads) & set(other.groups.get(g, []))), len(heads)) for g, heads in base.groups.items()}
