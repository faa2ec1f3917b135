"""The report's words for each figure: a readable title, a one-line caption saying what to look
for, and, for a figure with nothing to show (an empty circuit, a stage with no head to test),
the sentence said instead. Figures are known by their stems (`results.figure_stem`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from et_circuits.presentation.report import FigureText

from . import results as layout

WHERE = {"paper": "at the paper's positions", "discovered": "at the discovered positions"}

# (stem pattern with {model}, title, caption); {where}: the reading of the figure.
PER_MODEL = (
    (
        "{model}_sweep",
        "{model}: where the effect lives (position sweep)",
        "Every head of one layer patched at one position from the corrupt prompt; red lowers the answer's "
        "probability. Starred positions are marked; the discovered circuit is found there.",
    ),
    (
        "{model}_(discovered_)?path_patching",
        "{model}: path-patching scores {where}",
        "One panel per discovery step; the boxed heads (the most negative scores) make the step's group.",
    ),
    (
        "{model}_(discovered_)?attribution",
        "{model}: attribution against exact path patching {where}",
        "Each sender scored both ways: its first-order estimate (attribution) against its exact score; ρ is "
        "their Spearman correlation. Filled: the step's group. {chosen}",
    ),
    (
        "{model}_(discovered_)?completeness",
        "{model}: completeness of the circuit {where}",
        "F(C∖K) against F(M∖K) for knocked-out sets K: a complete circuit lies on the diagonal.",
    ),
    (
        "{model}_(discovered_)?circuit",
        "Figure 1: the {model} circuit {where}",
        "Heads by layer, in columns at the positions they act; arrows name the input each step was found through.",
    ),
)
PER_STAGE = {
    "table1": (
        "Table 1: the base circuit on every model",
        "Accuracy of the full model, of the circuit alone (everything else mean-ablated) and of random circuits "
        "of the same sizes; faithfulness = circuit / full.",
    ),
    "dcm": (
        "Figure 2: what each group carries (DCM) {where}",
        "Accuracy (% of the desideratum's target) with the group's selected heads patched from the source "
        "prompt: a high bar says the group carries that information.",
    ),
    "dcm_extra": (
        "Group B on every desideratum",
        "Does group B carry the ordinal of the queried segment through changes of the surface text? The two "
        "controls (is not in, wrong segment) should stay low.",
    ),
    "cmap": (
        "Figure 3: fine-tuned heads patched into the base model {where}",
        "Base accuracy with one head set's outputs taken from the fine-tuned model; dashed: the two models "
        "alone. A bar near the upper line: that set carries the fine-tune's gain.",
    ),
    "cmap_input": (
        "Input patching {where}",
        "The same with only the queries, keys or values of the heads taken from the fine-tuned model.",
    ),
    "knockout": (
        "Attention knockout",
        "Accuracy with one attention edge blocked in every head from layer L on: a dip says the layers up to L "
        "use that edge.",
    ),
}


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def texts(results: Path, models: list[str]) -> Callable[[str], FigureText]:
    """`FigureText` of every figure stem of a run under `results`."""
    dcm, cmap = _csv(results / layout.DCM_CSV), _csv(results / layout.CMAP_CSV)

    def reading_of(stem: str) -> str:
        return "discovered" if "discovered" in stem else "paper"

    def text(stem: str) -> FigureText:
        reading = reading_of(stem)
        where = WHERE[reading]
        for model in sorted(models, key=len, reverse=True):  # "a-b" before "a"
            for pattern, title, caption in PER_MODEL:
                if re.fullmatch(pattern.format(model=re.escape(model)), stem):
                    chosen = _chosen_by(results, model, reading)
                    return FigureText(
                        title.format(model=model, where=where),
                        caption.format(chosen=chosen),
                        _empty_model(results, model, reading, stem),
                    )
        base = re.sub("_discovered$", "", stem)
        if base in PER_STAGE:
            title, caption = PER_STAGE[base]
            return FigureText(title.format(where=where), caption, _empty_stage(base, reading, dcm, cmap))
        return FigureText(stem)

    return text


def _chosen_by(results: Path, model: str, reading: str) -> str:
    """Which method chose the circuit's groups, from circuit.json."""
    path = layout.circuit_path(results, model, reading)
    chosen = (layout.read_json_or_empty(path) if path.exists() else {}).get("chosen_by") or {}
    method = chosen.get("method", "fast")
    if chosen.get("screen"):
        return (
            f"Exact path patching ({method}) chose every group, among the {chosen['screen']} senders per step that "
            "attribution ranked first (screened); attribution alone chose nothing."
        )
    return f"Exact path patching ({method}) scored every sender and chose every group."


def _empty_model(results: Path, model: str, reading: str, stem: str) -> str | None:
    """What to say instead of a model's figure that would show an empty circuit."""
    if not stem.endswith(("_circuit", "_completeness")):
        return None
    path = layout.circuit_path(results, model, reading)
    if path.exists() and len(layout.load_circuit(results, model, reading)) == 0:
        return (
            f"The {model} circuit {WHERE[reading]} is empty: no head survived minimality (keeping any of them "
            "changed accuracy by less than the threshold), so there is nothing to draw."
        )
    return None


def _empty_stage(stage: str, reading: str, dcm: pd.DataFrame | None, cmap: pd.DataFrame | None) -> str | None:
    """What to say instead of a stage's figure whose groups or head sets are all empty."""
    section = layout.SECTIONS_OF[reading][0]
    if stage == "dcm" and dcm is not None:
        rows = dcm[dcm.circuit == section]
        if len(rows) and not (rows.group_size > 0).any():
            return f"Every group of the base circuit {WHERE[reading]} is empty: DCM has no head to test."
    if stage == "dcm_extra" and dcm is not None:
        rows = dcm[(dcm.circuit == section) & (dcm.letter == "B")]
        if len(rows) and not (rows.group_size > 0).any():
            return f"Group B of the base circuit {WHERE[reading]} is empty: DCM has no head to test."
    if stage in ("cmap", "cmap_input") and cmap is not None:
        rows = cmap[cmap.positions == reading]
        if len(rows) and not (rows.n_heads > 0).any():
            return f"No head set {WHERE[reading]} has a head (the circuits are empty there): nothing was patched."
    return None
