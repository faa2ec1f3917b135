"""The toolkit's small shared types: heads, receivers, and the paper's table of circuit groups
(name, letter, title, position, colour, and how path patching reaches each group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

Head = tuple[int, int]  # (layer, head)
INPUT_KINDS = ("q", "k", "v")  # the attention inputs a receiver (or a CMAP input patch) can take


class Receiver(NamedTuple):
    """A head whose `kind` input ("q", "k" or "v", before rotary) at `position` (a position spec
    of the prompts) receives a path-patching sender's effect."""

    layer: int
    head: int
    kind: str
    position: str


@dataclass(frozen=True)
class GroupSpec:
    """One group of the paper's circuit. `position` is where its heads act; `receiver_kind` is
    the input through which path patching scores its senders on the previous group (None: the
    first group, scored on the logits)."""

    name: str
    letter: str
    title: str
    position: str
    colour: str
    receiver_kind: str | None


# The paper's four groups, in the order path patching finds them (Figure 1, Section 3).
PAPER_GROUPS: tuple[GroupSpec, ...] = (
    GroupSpec("value_fetcher", "A", "Value Fetcher", "last", "#d62728", None),
    GroupSpec("pos_transmitter", "B", "Position Transmitter", "last", "#1f77b4", "q"),
    GroupSpec("pos_detector", "C", "Position Detector", "query_label", "#2ca02c", "v"),
    GroupSpec("struct_reader", "D", "Structure Reader", "prev_query_label", "#9467bd", "v"),
)
GROUPS: dict[str, GroupSpec] = {g.name: g for g in PAPER_GROUPS}

# How figures name the entity-tracking task's positions.
POSITION_TITLES: dict[str, str] = {
    "prev_query_label": "previous query label",
    "query_label": "query label",
    "last": "last token",
}


def letter(group: str) -> str:
    """The paper's letter of a group (A-D), or the group's own name for other groups."""
    return GROUPS[group].letter if group in GROUPS else group


def group_title(group: str) -> str:
    """"A: Value Fetcher" for the paper's groups, the name itself for others."""
    return f"{GROUPS[group].letter}: {GROUPS[group].title}" if group in GROUPS else group
