"""How figures name and colour things: head labels, group letters, titles and colours (the
entity-tracking paper's table for its groups, a palette for any other), position titles."""

from __future__ import annotations

from collections.abc import Sequence

from et_circuits.tasks.entity_tracking.paper import GROUPS, POSITION_TITLES, group_title, letter

__all__ = [
    "OTHER_COLOUR",
    "colour",
    "empty_panel",
    "group_colours",
    "group_title",
    "head_label",
    "letter",
    "position_title",
]

OTHER_COLOUR = "#8c564b"  # a group outside the paper's table, where one colour will do
PALETTE = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e", "#7f7f7f")  # the others, in turn


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def colour(group: str) -> str:
    return GROUPS[group].colour if group in GROUPS else OTHER_COLOUR


def group_colours(groups: Sequence[str]) -> dict[str, str]:
    """A colour per group: the paper's for its groups, PALETTE's in turn for the others."""
    others = [g for g in groups if g not in GROUPS]
    return {g: GROUPS[g].colour if g in GROUPS else PALETTE[others.index(g) % len(PALETTE)] for g in groups}


def position_title(spec) -> str:
    specs = (spec,) if isinstance(spec, str) else tuple(spec)
    return " / ".join(POSITION_TITLES.get(s, s) for s in specs)


def empty_panel(fig, panel: int, text: str) -> None:
    """Say in the middle of subplot `panel` (1-based) why it has nothing to draw."""
    axis = "" if panel == 1 else str(panel)
    fig.add_annotation(
        text=text,
        xref=f"x{axis} domain",
        yref=f"y{axis} domain",
        x=0.5,
        y=0.5,
        showarrow=False,
        font=dict(size=13, color="#a60"),
    )
