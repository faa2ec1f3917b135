"""The toolkit's small shared types: heads, receivers, discovery steps, the description of a
circuit group, and the names of the path-patching methods. Importing this module loads nothing
heavy (the command line builds its parser from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

Head = tuple[int, int]  # (layer, head)
INPUT_KINDS = ("q", "k", "v")  # the attention inputs a receiver (or a CMAP input patch) can take
PATH_PATCHING_METHODS = ("fast", "reference")  # `path_patch(..., method=)`: the same scores, two costs
Spec = str | tuple[str, ...]  # a position spec ("last", "labels+1"), or a union of them


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


@dataclass(frozen=True)
class Step:
    """One discovery step: the group it finds, the sender position (a spec or a union of specs),
    and the input kinds ("q", "k", "v", or several: "kv") through which its senders are scored
    on the previous group's heads (None: on the metric)."""

    group: str
    position: Spec
    receiver_kind: str | None
    receivers_from: str | None = None  # the group whose heads receive (default: the step before's)
