"""Where path patching's receivers sit, shared by the exact method and its gradient estimate:
receivers grouped by (input kind, position spec), and which sender slot feeds a receiver slot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .circuit import head_mask
from .errors import CircuitError
from .types import INPUT_KINDS, Head, Receiver


@dataclass(frozen=True)
class Sites:
    """Receivers grouped by (input kind, position spec): which heads receive there."""

    masks: dict[tuple[str, str], Bool[Tensor, "layer head"]]

    @classmethod
    def of(cls, receivers: Sequence[Receiver], n_layers: int, n_heads: int) -> Sites:
        by_site: dict[tuple[str, str], list[Head]] = {}
        for r in receivers:
            r = Receiver(*r)
            if r.kind not in INPUT_KINDS:
                raise CircuitError(f"receiver input {r.kind!r} is not one of {', '.join(INPUT_KINDS)}")
            by_site.setdefault((r.kind, r.position), []).append((int(r.layer), int(r.head)))
        return cls({site: head_mask(heads, n_layers, n_heads) for site, heads in by_site.items()})

    @property
    def layers(self) -> list[int]:
        """Every receiver layer, ascending."""
        return sorted({int(l) for m in self.masks.values() for l in m.any(1).nonzero()[:, 0].tolist()})


def match_slots(at: Int[Tensor, "n k"], where: Int[Tensor, "n m"]) -> Int[Tensor, "n m"]:
    """For each receiver slot, the sender slot at the same position (-1: none; the frozen run
    leaves the receiver's input there clean)."""
    same = (where[:, :, None] == at[:, None, :]) & (where[:, :, None] >= 0)  # n m k
    return torch.where(same.any(-1), same.int().argmax(-1), torch.full_like(where, -1))
