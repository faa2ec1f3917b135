"""The toolkit's small shared types: heads, receivers and the description of a circuit group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

Head = tuple[int, int]  # (layer, head)
INPUT_KINDS = ("q", "k", "v")  # the attention inputs a receiver (or a CMAP input patch) can take


class Receiver(NamedTuple):
    """A head whose `kind` input ("q", "k" or "v", before any q/k norm and rotary) at `position`
    (a position spec of the prompts) receives a path-patching sender's effect."""

    layer: int
    head: int
    kind: str
    position: str


@dataclass(frozen=True)
class GroupSpec:
    """How a circuit group is named and drawn: `letter` and `title` for tables and figures,
    `position` where its heads act, `colour`, and `receiver_kind`, the input through which path
    patching scores its senders on the group before it (None: on the metric). A task describes
    its groups with these; the methods never read them."""

    name: str
    letter: str
    title: str
    position: str
    colour: str
    receiver_kind: str | None
