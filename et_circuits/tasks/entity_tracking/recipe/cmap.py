"""The CMAP head sets of the paper's Figure 3 as a recipe: per group, the heads DCM selected for
the desideratum that group is known for (or the whole group), plus the full circuit; output
patching of every set and input patching of the value fetchers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.types import Head
from et_circuits.methods.cmap import INPUT_PATCHES, Variant

from ..paper import CMAP_SET_DESIDERATA as SET_DESIDERATA
from ..paper import FULL, letter


def cmap_head_sets(circuit: Circuit, selected: Mapping[str, Mapping[str, Sequence[Head]]] | None) -> dict[str, Circuit]:
    """The paper's sets, each a circuit of one group (or the whole circuit): A = DCM
    object-value heads of the value fetchers, B / C = DCM positional heads of the position
    transmitters / detectors, D = the whole structure-reader group, and the full circuit.
    `selected[group][desideratum]` are DCM's heads; a group DCM selected nothing for gets an
    empty set (reported as such, not patched); so do A-C without DCM results (None). Only the
    circuit's groups get a set: a group outside the paper's table (a discovered one) is patched
    whole, under its own name."""
    sets: dict[str, Circuit] = {}
    for group in [
        *(g for g in SET_DESIDERATA if g in circuit.groups),
        *(g for g in circuit.groups if g not in SET_DESIDERATA),
    ]:
        desideratum = SET_DESIDERATA.get(group)
        if desideratum is None:
            heads = list(circuit.groups[group])
        elif selected is None:
            heads = []
        else:
            try:
                heads = [tuple(h) for h in selected[group][desideratum]]
            except KeyError:
                raise CircuitError(f"no DCM {desideratum} heads for group {group!r}") from None
        positions = {group: circuit.positions[group]} if group in circuit.positions else {}
        sets[letter(group)] = Circuit({group: heads}, positions)
    sets[FULL] = circuit
    return sets


def variants(
    head_sets: Mapping[str, Circuit],
    output_sets: Sequence[str] | None = None,
    input_sets: Sequence[str] = ("A",),
    input_patches: Sequence[str] = INPUT_PATCHES,
) -> list[Variant]:
    """Output (`z`) patching for `output_sets` (default: every set) and each input patch kind
    for `input_sets` (the paper shows input patching for set A)."""
    output_sets = list(head_sets) if output_sets is None else list(output_sets)
    for name in [*output_sets, *input_sets]:
        if name not in head_sets:
            raise CircuitError(f"unknown head set {name!r}; known: {', '.join(head_sets)}")
    out = [Variant(name, "z", head_sets[name]) for name in output_sets]
    out += [Variant(name, p, head_sets[name]) for name in input_sets for p in input_patches]
    return out
