"""The report's tables: each a function (results folder, models) -> DataFrame, or None while
its result file is not there yet, with the paper's published numbers beside the run's; and the
report's sections (which tables and figures each shows). `build` reads a run and hands it to
`presentation.report` to render."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from et_circuits.core.circuit import Circuit
from et_circuits.core.prompts import spec_text
from et_circuits.presentation.report import Section, Table, render_page
from et_circuits.tasks.entity_tracking.paper import CITATION, PUBLISHED, letter, paper_model, published

from . import report_figures, report_story
from . import results as layout


def with_paper(frame: pd.DataFrame, table: str, key: str = "model") -> pd.DataFrame:
    """`frame` with the paper's column of PUBLISHED[table] beside each of its own, for the
    paper model of each row's `key`."""
    papers = [paper_model(str(name)) for name in frame[key]]
    columns = dict.fromkeys(c for p in papers for c in PUBLISHED[table].get(p or "", {}))
    out = frame.assign(**{"paper model": [p or "" for p in papers]})
    for column in columns:
        out[f"paper: {column}"] = [published(table, p, column) for p in papers]
    return out


# ---------------------------------------------------------------------------------------------
# Tables: each a function (results, models) -> DataFrame, or None while its file is not there yet


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _wide(
    frame: pd.DataFrame, index: list[str], columns: str | pd.Series, values: str, keep: tuple[str, ...] = ()
) -> pd.DataFrame:
    """One row per `index` value with `keep` (from its first row), then one column per
    `columns` value holding `values`; rows and columns in order of first appearance."""
    columns = frame[columns] if isinstance(columns, str) else columns
    frame = frame.assign(_column=columns.to_numpy())
    wide = frame.pivot(index=index, columns="_column", values=values)[list(frame._column.unique())]
    first = frame.drop_duplicates(index)[index + list(keep)]
    return first.merge(wide.reset_index(), on=index).rename_axis(columns=None)


def paper_rows_only(frame: pd.DataFrame) -> pd.DataFrame:
    """Blank the paper's columns on rows of the discovered reading (`positions` != "paper"):
    the paper published numbers at its own positions only."""
    if "positions" not in frame:
        return frame
    out = frame.copy()
    other = out.positions != "paper"
    out.loc[other, [c for c in out.columns if c.startswith("paper")]] = ""
    return out


def table1_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / layout.TABLE1)
    return None if frame is None else paper_rows_only(with_paper(frame, "table1"))


def sizes_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    rows = []
    for reading in layout.READING_DIRS:
        for name in models:
            path = layout.circuit_path(results, name, reading)
            if path.exists():
                circuit = Circuit.load(path)
                sizes = {letter(g): len(heads) for g, heads in circuit.groups.items()}
                where = "; ".join(f"{letter(g)}: {spec_text(circuit.positions_of(g))}" for g in circuit.groups)
                rows.append({"model": name, "positions": reading, **sizes, "total": len(circuit), "acting at": where})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    counts = [c for c in frame.columns if c not in ("model", "positions", "acting at")]
    frame[counts] = frame[counts].map(lambda v: "–" if pd.isna(v) else str(int(v)))  # a group a reading lacks: –
    return paper_rows_only(with_paper(frame, "circuit_size"))


def overlap_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / layout.OVERLAP)
    if frame is None:
        return None
    if "positions" not in frame:
        frame = frame.assign(positions="paper")
    return paper_rows_only(with_paper(_wide(frame, ["model", "positions"], "group", "overlap"), "overlap"))


def sweep_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    """Per model: the positions the sweep marked as carrying an effect, and where the
    discovered circuit's groups act."""
    rows = []
    for name in models:
        sweep = layout.read_json_or_empty(layout.reading_dir(results, name, "discovered") / layout.SWEEP)
        if not sweep:
            continue
        path = layout.circuit_path(results, name, "discovered")
        circuit = Circuit.load(path) if path.exists() else None
        rows.append(
            {
                "model": name,
                "prompts": sweep.get("n", ""),
                "mark at (share of the largest)": sweep.get("mark", ""),
                "marked positions": ", ".join(sweep.get("marked", [])),
                "discovered groups": ""
                if circuit is None
                else "; ".join(
                    f"{letter(g)} ({len(hs)} h): {spec_text(circuit.positions_of(g))}"
                    for g, hs in circuit.groups.items()
                ),
            }
        )
    return pd.DataFrame(rows) if rows else None


def figure2_table(results: Path, models: list[str], section: str = "base_circuit") -> pd.DataFrame | None:
    """DCM on the base circuit (of one reading: `section`): one row per group and desideratum,
    mean ± std (%) per model, then the paper's value per paper model (paper reading only)."""
    frame = _csv(results / layout.DCM_CSV)
    if frame is None:
        return None
    rows = frame[frame.circuit == section]
    if rows.empty:
        return rows
    rows = rows.assign(
        cell=[
            f"{m:.1f} ± {s:.1f}" if size else "no heads"  # an empty group patches nothing: no number to show
            for m, s, size in zip(rows.accuracy_mean, rows.accuracy_std, rows.group_size)
        ],
        row=rows.letter + " " + rows.desideratum,
    )
    wide = _wide(rows, ["row"], "model", "cell")
    for paper in PUBLISHED["figure2"] if section == "base_circuit" else ():
        wide[f"paper: {paper}"] = [published("figure2", paper, r) for r in wide.row]
    return wide.rename(columns={"row": "group desideratum"})


def figure2_discovered_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    return figure2_table(results, models, "base_discovered")


def _cmap_wide(frame: pd.DataFrame, column: pd.Series, table: str) -> pd.DataFrame:
    """One row per source model and reading: both baselines, then per `column` "accuracy (heads)"."""
    if frame.empty:
        return pd.DataFrame()
    cells = [f"{'–' if pd.isna(a) else f'{a:.3f}'} ({n} h)" for a, n in zip(frame.accuracy, frame.n_heads)]
    frame = frame.assign(cell=cells).rename(columns={"base": "base model"})
    if "positions" not in frame:
        frame = frame.assign(positions="paper")
    keep = ("base model", "base_accuracy", "source_accuracy", "n")
    wide = _wide(frame, ["source", "positions"], column, "cell", keep)
    wide = wide.rename(columns={"base_accuracy": "base accuracy", "source_accuracy": "source accuracy"})
    return paper_rows_only(with_paper(wide, table, key="source"))


def figure3_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / layout.CMAP_CSV)
    if frame is None:
        return None
    outputs = frame[frame.patch == "z"]
    return _cmap_wide(outputs, outputs.set, "figure3")


def input_patching_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / layout.CMAP_CSV)
    if frame is None:
        return None
    inputs = frame[frame.patch != "z"]
    return _cmap_wide(inputs, inputs.set + " " + inputs.patch, "cmap_input")


def knockout_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / layout.KNOCKOUT_CSV)
    if frame is None:
        return None
    wide = _wide(frame, ["model", "edge"], "from L" + frame.from_layer.astype(str), "accuracy", ("full_accuracy", "n"))
    return wide.rename(columns={"full_accuracy": "no knockout"})


# ---------------------------------------------------------------------------------------------
# The models and settings of the run


def models_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    rows = []
    for i, name in enumerate(models):
        meta = layout.first_step_metadata(results, name)
        minimality = layout.read_json_or_empty(results / name / layout.MINIMALITY)
        rows.append(
            {
                "model": name,
                "role": "base" if i == 0 else "fine-tuned",
                "paper model": paper_model(name) or "",
                **{f"path patching {k}": meta.get(k, "") for k in ("n", "seed", "boxes", "dtype", "method")},
                "top-k (A B C D)": " ".join(map(str, minimality.get("top_k", []))),
                "minimality threshold": minimality.get("threshold", ""),
                "minimality n": minimality.get("n", ""),
            }
        )
    return pd.DataFrame(rows) if rows else None


def dcm_settings_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    rows = [
        {"model": name, "base circuit": d.get("base", ""), **d.get("settings", {})}
        for name in models
        if (d := layout.read_json_or_empty(results / name / layout.DCM))
    ]
    return pd.DataFrame(rows) if rows else None


# ---------------------------------------------------------------------------------------------
# The page


@dataclass(frozen=True)
class TableSpec:
    """A table of the report: its caption, how it is built from the result files, the file(s)
    it reads (relative to RESULTS) and the make target that writes them."""

    caption: str
    build: Callable[[Path, list[str]], pd.DataFrame | None]
    source: str
    target: str


@dataclass(frozen=True)
class SectionSpec:
    id: str
    title: str
    tables: tuple[TableSpec, ...]
    figures: tuple[str, ...]  # figure stems (fnmatch patterns), in page order


SECTIONS = (
    SectionSpec(
        "sweep",
        "Where the mechanism lives: the position sweep",
        (
            TableSpec(
                "Positions whose heads carry an effect (the layer sweep's marks) and where the discovered "
                "circuit's groups act",
                sweep_table,
                "<model>/discovered/sweep.json",
                "circuit",
            ),
        ),
        ("*_sweep",),
    ),
    SectionSpec(
        "circuit",
        "The circuit and Table 1 (at the discovered positions and at the paper's)",
        (
            TableSpec(
                "Table 1: the base circuit on every model, at the paper's positions and at the discovered "
                "ones; slots = share of the (head, position) slots at the circuit's positions that it keeps",
                table1_table,
                "table1.csv",
                "circuit",
            ),
            TableSpec(
                "Circuit size per group",
                sizes_table,
                "<model>/circuit.json, <model>/discovered/circuit.json",
                "circuit",
            ),
            TableSpec(
                "Overlap: heads of the base circuit in each model's circuit", overlap_table, "overlap.csv", "circuit"
            ),
        ),
        (
            "*_discovered_circuit",
            "*_circuit",
            "table1",
            "*_discovered_path_patching",
            "*_path_patching",
            "*_attribution",
            "*_completeness",
        ),
    ),
    SectionSpec(
        "dcm",
        "Figure 2: what each group encodes (DCM)",
        (
            TableSpec(
                "Accuracy (% of the desideratum's target) with each group's DCM heads patched, on the "
                "base circuit at the paper's positions, mean ± std over resamplings",
                figure2_table,
                "dcm.csv",
                "dcm",
            ),
            TableSpec(
                "The same on the base circuit at the discovered positions", figure2_discovered_table, "dcm.csv", "dcm"
            ),
        ),
        ("dcm_discovered", "dcm", "dcm_extra"),
    ),
    SectionSpec(
        "cmap",
        "Figure 3: cross-model activation patching",
        (
            TableSpec(
                "Base-model accuracy with the fine-tuned model's head outputs patched in (accuracy, heads patched)",
                figure3_table,
                "cmap.csv",
                "cmap",
            ),
            TableSpec("Input patching (q, k, v of the head set)", input_patching_table, "cmap.csv", "cmap"),
        ),
        ("cmap_discovered", "cmap", "cmap_input_discovered", "cmap_input"),
    ),
    SectionSpec(
        "knockout",
        "Attention knockout",
        (TableSpec("Accuracy with the edge blocked from layer L on", knockout_table, "knockout.csv", "knockout"),),
        ("knockout",),
    ),
    SectionSpec(
        "run",
        "Models and settings",
        (
            TableSpec(
                "The models of the run (the first is the base) and their path-patching settings",
                models_table,
                "<model>/path_patching, <model>/minimality.json",
                "circuit",
            ),
            TableSpec("DCM settings", dcm_settings_table, "<model>/dcm.json", "dcm"),
        ),
        (),
    ),
)


def discover_models(results: Path) -> list[str]:
    """The models with results: table1.csv's order (base first), else every <model>/circuit.json."""
    table = _csv(results / layout.TABLE1)
    if table is not None:
        return list(dict.fromkeys(table.model))
    return sorted(p.parent.name for p in results.glob(f"*/{layout.CIRCUIT}"))


def build(results: Path, figures_dir: Path, models: list[str] | None = None) -> str:
    """The report page of the run under `results` (result files) and `figures_dir` (figure
    JSONs); `models` in run order, base first (default: `discover_models`)."""
    results, figures_dir = Path(results), Path(figures_dir)
    models = list(models) if models else discover_models(results)
    sections = [
        Section(
            spec.id,
            spec.title,
            tuple(Table(t.caption, t.build(results, models), str(results / t.source), t.target) for t in spec.tables),
            spec.figures,
        )
        for spec in SECTIONS
    ]
    who = html.escape(", ".join(models) or "no models")
    where = f"{html.escape(str(results))}; the figures from {html.escape(str(figures_dir))}"
    intro = (
        f"A run of the entity-tracking study ({html.escape(CITATION)}) on {who} (the first is the base model). "
        f"Every number comes from {where}. Columns <em>paper: …</em> hold the published numbers of the 7B "
        "model each row stands in for.",
    )
    return render_page(
        "Entity-tracking circuits: report of a run",
        intro,
        sections,
        figures_dir,
        models,
        claims=report_story.claims(results, models),
        mechanism=report_story.mechanism(results, models),
        figure_text=report_figures.texts(results, models),
    )
