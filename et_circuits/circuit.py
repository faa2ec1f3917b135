"""The `Circuit` type: named groups of heads, each acting at one or more positions of the
prompts, with JSON read/write.

Positions are position specs of a PromptSet ("last", "query_label", "labels+1", ...). Our JSON
format is {"groups": {group: [[layer, head], ...]}, "positions": {group: spec or [spec, ...]}}.
The authors' published format, {"value_fetcher": [[l, h], ...], "pos_transmitter": ..., ...},
reads with the paper's positions (`types.PAPER_GROUPS`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from .errors import CircuitError
from .io import write_json
from .prompts import parse_spec
from .types import GROUPS, Head

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


def paper_positions(groups: Iterable[str]) -> dict[str, str]:
    """The paper's position of each of its groups (CircuitError for another group)."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise CircuitError(f"group {unknown[0]!r} has no position; the paper's groups are {', '.join(GROUPS)}")
    return {g: GROUPS[g].position for g in groups}


@dataclass
class Circuit:
    """Group name -> list of (layer, head), and the position(s) each group acts at (default:
    the paper's position for the paper's groups)."""

    groups: dict[str, list[Head]]
    positions: dict[str, str | tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = {g: [tuple(map(int, h)) for h in heads] for g, heads in self.groups.items()}
        given = dict(self.positions)
        missing = [g for g in self.groups if g not in given]
        given.update(paper_positions(missing))
        self.positions = given
        for g in self.groups:
            _positions(g, self.positions[g])
            if len(set(self.groups[g])) != len(self.groups[g]):
                raise CircuitError(f"group {g!r} lists a head twice")

    def __len__(self) -> int:
        return sum(len(h) for h in self.groups.values())

    def positions_of(self, group: str) -> tuple[str, ...]:
        """The position specs a group acts at."""
        return _positions(group, self.positions[group])

    def entries(self) -> list[Entry]:
        """Every (group, head), in group order."""
        return [(g, h) for g, heads in self.groups.items() for h in heads]

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
        return head_mask(self.groups.get(group, []), n_layers, n_heads)

    def keep_only(self, entries: Iterable[Entry]) -> "Circuit":
        """A copy with only the given (group, head) entries (groups keep their positions)."""
        keep = set(entries)
        return Circuit({g: [h for h in hs if (g, h) in keep] for g, hs in self.groups.items()}, dict(self.positions))

    def without(self, entries: Iterable[Entry]) -> "Circuit":
        """A copy without the given (group, head) entries."""
        drop = set(entries)
        return Circuit({g: [h for h in hs if (g, h) not in drop] for g, hs in self.groups.items()}, dict(self.positions))

    def to_dict(self) -> dict:
        return {
            "groups": {g: [list(h) for h in heads] for g, heads in self.groups.items()},
            "positions": {g: p if isinstance(p, str) else list(p) for g, p in self.positions.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping) -> "Circuit":
        """Our format ({"groups", "positions"}) or the authors' ({group: [[l, h], ...]})."""
        if not isinstance(d, Mapping):
            raise CircuitError("a circuit is a JSON object")
        groups, positions = (d["groups"], d.get("positions", {})) if "groups" in d else (d, {})
        if not isinstance(groups, Mapping) or not isinstance(positions, Mapping):
            raise CircuitError("circuit 'groups' and 'positions' must be objects")
        for g, heads in groups.items():
            ok = isinstance(heads, list) and all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, int) for x in h)
                for h in heads
            )
            if not ok:
                raise CircuitError(f"group {g!r} must be a list of [layer, head] integer pairs")
        return cls(
            {g: [tuple(h) for h in heads] for g, heads in groups.items()},
            {g: p if isinstance(p, str) else tuple(p) for g, p in positions.items()},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CircuitError(f"no circuit file at {path}") from None
        except json.JSONDecodeError as e:
            raise CircuitError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


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
    return {
        g: (len(set(heads) & set(other.groups.get(g, []))), len(heads))
        for g, heads in base.groups.items()
    }
