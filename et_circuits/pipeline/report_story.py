"""The report's summary: the paper's three claims, each with its published finding beside what
this run found (one sentence each, with the numbers, computed from the result files), and the
mechanism the run found. A claim whose result files are missing says which stage to run.

The verdicts are simple, stated rules, so that a reader can check them:
1. the base circuit is faithful (>= 0.8) on every fine-tuned model in some reading;
2. each group of the base circuit carries the same information (its best desideratum) in
   every model;
3. some head set of each improving fine-tune, patched into the base, recovers at least half
   of that fine-tune's gain.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from et_circuits.presentation.report import Claim
from et_circuits.tasks.entity_tracking.paper import PUBLISHED

from . import results as layout

FAITHFUL = 0.8  # claim 1's bar
RECOVERED = 0.5  # claim 3's bar: the share of a fine-tune's gain one head set brings back


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _reading_text(reading: str) -> str:
    return "at the paper's positions" if reading == "paper" else "at the positions the sweep discovered"


def same_circuit(results: Path, models: list[str]) -> Claim:
    """Claim 1, from table1.csv and the base circuit's size."""
    paper = PUBLISHED["table1"]
    found = (
        f"The Llama-7B circuit keeps faithfulness {paper['Vicuna-7B']['faithfulness']:.2f} / "
        f"{paper['Goat-7B']['faithfulness']:.2f} / {paper['FLoat-7B']['faithfulness']:.2f} in Vicuna / Goat / FLoat-7B."
    )
    title = "Fine-tuned models use the base model's circuit"
    table = _csv(results / layout.TABLE1)
    if table is None or not models:
        return Claim(title, found, "Not run yet (make circuit).", None, "circuit")
    base, tuned = models[0], models[1:]
    parts, holds = [], False
    for reading, rows in table.groupby("positions", sort=False):
        size = _circuit_size(results, base, reading)
        others = rows[rows.model.isin(tuned)]
        faith = " / ".join(f"{x:.2f}" for x in others.faithfulness) or "–"
        if size == 0:
            parts.append(f"{_reading_text(reading)} the {base} circuit is empty (minimality removed every head)")
            continue
        ok = len(others) > 0 and bool((others.faithfulness >= FAITHFUL).all())
        holds |= ok
        parts.append(
            f"{_reading_text(reading)} the {base} circuit ({size} heads) has faithfulness {faith} on "
            f"{' / '.join(others.model) or 'no other model'} (random circuits at most {rows.random.max():.3f})"
        )
    return Claim(title, found, _sentence("; ".join(parts)), holds, "circuit")


def _circuit_size(results: Path, name: str, reading: str) -> int | None:
    path = layout.circuit_path(results, name, reading)
    return len(layout.load_circuit(results, name, reading)) if path.exists() else None


def same_function(results: Path, models: list[str]) -> Claim:
    """Claim 2, from dcm.csv: each group's best desideratum on the base circuit, per model."""
    paper = PUBLISHED["figure2"]["Llama-7B"]
    found = (
        f"DCM: the value fetchers (A) carry the object's value ({paper['A object_value']:.1f}%), the position "
        f"transmitters and detectors (B, C) its position ({paper['B positional']:.1f}%, "
        f"{paper['C positional']:.1f}%), in every model; the box label is carried by none (≈ 0%)."
    )
    title = "The circuit's components do the same job in every model"
    frame = _csv(results / layout.DCM_CSV)
    if frame is None:
        return Claim(title, found, "Not run yet (make dcm).", None, "dcm")
    parts, holds = [], None
    for section in (layout.SECTIONS_OF["discovered"][0], layout.SECTIONS_OF["paper"][0]):
        rows = frame[(frame.circuit == section) & (frame.group_size > 0) & frame.desideratum.isin(MAIN)]
        if rows.empty:
            continue
        holds = True
        for group, by_group in rows.groupby("letter", sort=False):
            best = by_group.loc[by_group.groupby("model", sort=False).accuracy_mean.idxmax()]
            holds = holds and bool(best.desideratum.nunique() == 1)
            carried = best.desideratum.mode().iloc[0]
            values = by_group[by_group.desideratum == carried].accuracy_mean
            parts.append(f"{group}: {carried.replace('_', ' ')} {' / '.join(f'{v:.1f}' for v in values)}%")
        where = "the discovered positions" if section == layout.SECTIONS_OF["discovered"][0] else "the paper's"
        run = f"At {where}, per group, what it carries best ({' / '.join(dict.fromkeys(rows.model))}): "
        return Claim(title, found, run + "; ".join(parts) + ".", holds, "dcm")
    return Claim(title, found, "Every group of the base circuit is empty: nothing to ask DCM.", None, "dcm")


MAIN = ("positional", "object_value", "box_label_value")


def improved_mechanism(results: Path, models: list[str]) -> Claim:
    """Claim 3, from cmap.csv: the head set that brings back most of each fine-tune's gain."""
    paper = PUBLISHED["figure3"]["Goat-7B"]
    found = (
        f"Patching Goat-7B's value fetchers into Llama-7B raises its accuracy from {paper['base accuracy']:.2f} to "
        f"{paper['A']:.2f}, Goat's own ({paper['source accuracy']:.2f}): the gain is in what the circuit computes."
    )
    title = "Fine-tuning improves what the circuit computes"
    frame = _csv(results / layout.CMAP_CSV)
    if frame is None:
        return Claim(title, found, "Not run yet (make cmap).", None, "cmap")
    reading = "discovered" if (frame.positions == "discovered").any() else "paper"
    rows = frame[(frame.positions == reading) & (frame.patch == "z") & frame.accuracy.notna() & (frame.set != "full")]
    parts, holds = [], None
    for source, by_source in rows.groupby("source", sort=False):
        base, own = by_source.base_accuracy.iloc[0], by_source.source_accuracy.iloc[0]
        best = by_source.loc[by_source.accuracy.idxmax()]
        if own > base:
            share = (best.accuracy - base) / (own - base)
            holds = (holds is not False) and bool(share >= RECOVERED)
            parts.append(
                f"{source}'s {best.set} heads ({int(best.n_heads)}) raise {best.base} from {base:.3f} to "
                f"{best.accuracy:.3f} ({source} alone {own:.3f}: {share:.0%} of its gain)"
            )
        else:
            parts.append(f"{source} is no better than the base ({own:.3f} vs {base:.3f})")
    run = _sentence(f"{_reading_text(reading)}: " + "; ".join(parts)) if parts else "No head set was patched."
    return Claim(title, found, run, holds, "cmap")


def mechanism(results: Path, models: list[str]) -> str:
    """One sentence on how the base model finds the object: where the sweep marked, and whether
    group B carries the queried box's label (lexical) or its position (positional)."""
    if not models:
        return ""
    sweep = layout.read_json_or_empty(layout.reading_dir(results, models[0], "discovered") / layout.SWEEP)
    where = ", ".join(sweep.get("marked", [])) or "not run yet"
    frame = _csv(results / layout.DCM_CSV)
    kind = "undetermined (no DCM results for a group B)"
    if frame is not None:
        b = frame[(frame.model == models[0]) & (frame.letter == "B") & (frame.group_size > 0)]
        b = b[b.circuit == layout.SECTIONS_OF["discovered"][0]] if (b.circuit == "base_discovered").any() else b
        by = dict(zip(b.desideratum, b.accuracy_mean))
        if {"positional", "box_label_value"} <= set(by):
            label, position = by["box_label_value"], by["positional"]
            kind = (
                f"lexical: group B carries the queried box's label ({label:.1f}%) rather than its position "
                f"({position:.1f}%), so the object is found by matching labels"
                if label > position
                else f"positional: group B carries the box's position ({position:.1f}%) rather than its label "
                f"({label:.1f}%), as in the paper"
            )
    return f"The mechanism {models[0]} uses is {kind}. The position sweep marks: {where}."


def claims(results: Path, models: list[str]) -> list[Claim]:
    return [f(results, models) for f in (same_circuit, same_function, improved_mechanism)]
