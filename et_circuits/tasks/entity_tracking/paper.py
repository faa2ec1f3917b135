"""What the entity-tracking paper says, in one place: its citation, its four circuit groups
(name, letter, title, position, colour, receiver input), its discovery steps and top-k, its DCM
split sizes and CMAP head sets, the numbers it published, and a reader of the authors' circuit
format. Importing it loads no torch (the command line's parser reads its defaults).

Prakash, Rott Shaham, Haklay, Belinkov, Bau. Fine-Tuning Enhances Existing Mechanisms: A Case
Study on Entity Tracking. ICLR 2024.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from et_circuits.core.errors import CircuitError
from et_circuits.core.types import GroupSpec, Step

if TYPE_CHECKING:
    from et_circuits.core.circuit import Circuit

# The paper's four groups, in the order path patching finds them (Figure 1, Section 3).
PAPER_GROUPS: tuple[GroupSpec, ...] = (
    GroupSpec("value_fetcher", "A", "Value Fetcher", "last", "#d62728", None),
    GroupSpec("pos_transmitter", "B", "Position Transmitter", "last", "#1f77b4", "q"),
    GroupSpec("pos_detector", "C", "Position Detector", "query_label", "#2ca02c", "v"),
    GroupSpec("struct_reader", "D", "Structure Reader", "prev_query_label", "#9467bd", "v"),
)
GROUPS: dict[str, GroupSpec] = {g.name: g for g in PAPER_GROUPS}

# The paper's discovery: each group's path-patching step, at its position, through its input.
PAPER_STEPS: tuple[Step, ...] = tuple(Step(g.name, g.position, g.receiver_kind) for g in PAPER_GROUPS)
PAPER_TOP_K = (20, 5, 10, 5)  # Llama-7B; Goat and FLoat used (50, 20, 30, 5)
# Not the paper's: 20/5/10/5 of 1024 heads would take most of a 16-head model, so the recipe caps
# each step's top-k at this fraction of all heads (it only bites on small models).
TOP_K_CAP = 0.25

# DCM's pairs per desideratum: train / eval (mask selection) / test (the reported accuracy).
DCM_SPLIT_SIZES: tuple[int, int, int] = (1000, 500, 500)

# Figure 3's head sets: per group, the DCM desideratum whose selected heads are patched (None:
# the whole group), plus the full circuit; the bars in the paper's order.
CMAP_SET_DESIDERATA: dict[str, str | None] = {
    "value_fetcher": "object_value",
    "pos_transmitter": "positional",
    "pos_detector": "positional",
    "struct_reader": None,
}
FULL = "full"
CMAP_SET_ORDER = ("D", "C", "B", "A", FULL)
CMAP_SETS = tuple(GROUPS[g].letter for g in CMAP_SET_DESIDERATA) + (FULL,)

# How figures name the task's positions.
POSITION_TITLES: dict[str, str] = {
    "prev_query_label": "previous query label",
    "query_label": "query label",
    "last": "last token",
}


def letter(group: str) -> str:
    """The paper's letter of a group (A-D), or the group's own name for other groups."""
    return GROUPS[group].letter if group in GROUPS else group


def group_title(group: str) -> str:
    """ "A: Value Fetcher" for the paper's groups, the name itself for others."""
    return f"{GROUPS[group].letter}: {GROUPS[group].title}" if group in GROUPS else group


def paper_circuit(groups: Mapping) -> Circuit:
    """A circuit in the authors' published format, {"value_fetcher": [[layer, head], ...],
    "pos_transmitter": ..., "pos_detector": ..., "struct_reader": ...}, at the paper's positions."""
    if not isinstance(groups, Mapping):
        raise CircuitError("a circuit in the authors' format is a JSON object of groups")
    from et_circuits.core.circuit import Circuit, head_lists

    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise CircuitError(f"group {unknown[0]!r} is not one of the paper's groups ({', '.join(GROUPS)})")
    return Circuit(head_lists(groups), {g: GROUPS[g].position for g in groups})


def load_paper_circuit(path: str | os.PathLike) -> Circuit:
    """`paper_circuit` of a JSON file in the authors' format."""
    from et_circuits.core.circuit import read_circuit_json

    return paper_circuit(read_circuit_json(path))


# ---------------------------------------------------------------------------------------------
# Published numbers

CITATION = (
    "Prakash, Rott Shaham, Haklay, Belinkov, Bau. Fine-Tuning Enhances Existing Mechanisms: "
    "A Case Study on Entity Tracking. ICLR 2024, arXiv 2402.14811"
)

# The paper's published numbers (its Table 1, Figure 2, Figure 3 and circuit sizes, as read from
# the authors' results), the one home of them in the package: PUBLISHED[table][paper model][column].
PUBLISHED: dict[str, dict[str, dict[str, float | str]]] = {
    "table1": {
        "Llama-7B": {"full": 0.66, "circuit": 0.66, "random": 0.00, "faithfulness": 1.00},
        "Vicuna-7B": {"full": 0.67, "circuit": 0.65, "random": 0.00, "faithfulness": 0.97},
        "Goat-7B": {"full": 0.82, "circuit": 0.73, "random": 0.01, "faithfulness": 0.89},
        "FLoat-7B": {"full": 0.82, "circuit": 0.72, "random": 0.01, "faithfulness": 0.88},
    },
    "circuit_size": {
        "Llama-7B": {"A": 40, "B": 7, "C": 20, "D": 5, "total": 72},
        "Goat-7B": {"A": 68, "B": 28, "C": 40, "D": 39, "total": 175},
        "FLoat-7B": {"A": 68, "B": 29, "C": 40, "D": 38, "total": 175},
    },
    "overlap": {  # heads of the Llama circuit in the fine-tuned model's circuit
        "Goat-7B": {"A": "27/40", "B": "6/7", "C": "16/20", "D": "5/5"},
        "FLoat-7B": {"A": "27/40", "B": "7/7", "C": "15/20", "D": "5/5"},
    },
    "figure2": {  # % of the desideratum's target, Llama circuit; D near chance, box label ~0
        paper: {
            "A object_value": a,
            "B positional": b,
            "C positional": c,
            "D positional": "≈ 13",
            "D object_value": "≈ 13",
            **{f"{g} box_label_value": "≈ 0" for g in "ABCD"},
        }
        for paper, a, b, c in [
            ("Llama-7B", 45.6, 36.9, 44.0),
            ("Vicuna-7B", 56.4, 35.0, 37.7),
            ("Goat-7B", 65.9, 38.6, 44.2),
            ("FLoat-7B", 63.3, 47.1, 54.7),
        ]
    },
    "figure3": {  # accuracy of Llama-7B with the source's heads patched in (outputs)
        "Goat-7B": {
            "base accuracy": 0.66,
            "source accuracy": 0.82,
            "A": 0.82,
            "B": 0.78,
            "C": 0.62,
            "D": 0.65,
            "full": 0.82,
        },
        "FLoat-7B": {
            "base accuracy": 0.66,
            "source accuracy": 0.82,
            "A": 0.82,
            "B": 0.74,
            "C": 0.56,
            "D": 0.65,
            "full": 0.82,
        },
    },
    "cmap_input": {  # Goat -> Llama, group A's inputs
        "Goat-7B": {"A q": 0.77, "A k": 0.63, "A v": 0.69, "A qk": 0.76, "A qkv": 0.77},
    },
}
# Decimals the paper gives for each table's numbers (its values are shown as published).
PUBLISHED_DECIMALS = {"table1": 2, "figure2": 1, "figure3": 2, "cmap_input": 2}
# Which paper model a run's model stands in for, by name (fine-tunes first: "goat" before "llama").
PAPER_NAMES = {"vicuna": "Vicuna-7B", "goat": "Goat-7B", "float": "FLoat-7B", "llama": "Llama-7B"}


def paper_model(name: str) -> str | None:
    """The paper's model that `name` (a registry name or directory) corresponds to, if any."""
    return next((paper for key, paper in PAPER_NAMES.items() if key in name.lower()), None)


def published(table: str, paper: str | None, column: str) -> str:
    """The paper's value of `column` in `table` for `paper` (its model), as the paper writes
    it; "" where the paper has none."""
    value = PUBLISHED[table].get(paper or "", {}).get(column, "")
    return f"{value:.{PUBLISHED_DECIMALS[table]}f}" if isinstance(value, float) else str(value)
