"""The report page: one self-contained HTML file (plotly.js inlined once, no network) with every
figure of a run, every result table beside the paper's published numbers, and the models and
settings that produced it. Pure functions from the result files to HTML: a stage not run yet is
named on the page, not an error."""

from __future__ import annotations

import fnmatch
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .circuit import Circuit
from .prompts import spec_text
from .types import letter

PAPER = (
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
            "A object_value": a, "B positional": b, "C positional": c,
            "D positional": "≈ 13", "D object_value": "≈ 13",
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
        "Goat-7B": {"base accuracy": 0.66, "source accuracy": 0.82, "A": 0.82, "B": 0.78, "C": 0.62, "D": 0.65, "full": 0.82},
        "FLoat-7B": {"base accuracy": 0.66, "source accuracy": 0.82, "A": 0.82, "B": 0.74, "C": 0.56, "D": 0.65, "full": 0.82},
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


def _wide(frame: pd.DataFrame, index: list[str], columns: str | pd.Series, values: str,
          keep: tuple[str, ...] = ()) -> pd.DataFrame:
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
    frame = _csv(results / "table1.csv")
    return None if frame is None else paper_rows_only(with_paper(frame, "table1"))


READING_DIRS = {"paper": "", "discovered": "discovered"}  # RESULTS/<model>/<dir>/circuit.json


def sizes_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    rows = []
    for reading, sub in READING_DIRS.items():
        for name in models:
            path = results / name / sub / "circuit.json"
            if path.exists():
                circuit = Circuit.load(path)
                sizes = {letter(g): len(heads) for g, heads in circuit.groups.items()}
                where = "; ".join(f"{letter(g)}: {spec_text(circuit.positions_of(g))}" for g in circuit.groups)
                rows.append({"model": name, "positions": reading, **sizes, "total": len(circuit), "acting at": where})
    return paper_rows_only(with_paper(pd.DataFrame(rows), "circuit_size")) if rows else None


def overlap_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / "overlap.csv")
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
        sweep = _json(results / name / "discovered" / "sweep.json")
        if not sweep:
            continue
        path = results / name / "discovered" / "circuit.json"
        circuit = Circuit.load(path) if path.exists() else None
        rows.append({
            "model": name, "prompts": sweep.get("n", ""), "mark at (share of the largest)": sweep.get("mark", ""),
            "marked positions": ", ".join(sweep.get("marked", [])),
            "discovered groups": "" if circuit is None else "; ".join(
                f"{letter(g)} ({len(hs)} h): {spec_text(circuit.positions_of(g))}" for g, hs in circuit.groups.items()),
        })
    return pd.DataFrame(rows) if rows else None


def figure2_table(results: Path, models: list[str], section: str = "base_circuit") -> pd.DataFrame | None:
    """DCM on the base circuit (of one reading: `section`): one row per group and desideratum,
    mean ± std (%) per model, then the paper's value per paper model (paper reading only)."""
    frame = _csv(results / "dcm.csv")
    if frame is None:
        return None
    rows = frame[frame.circuit == section]
    if rows.empty:
        return rows
    rows = rows.assign(
        cell=[f"{m:.1f} ± {s:.1f}" for m, s in zip(rows.accuracy_mean, rows.accuracy_std)],
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
    frame = _csv(results / "cmap.csv")
    if frame is None:
        return None
    outputs = frame[frame.patch == "z"]
    return _cmap_wide(outputs, outputs.set, "figure3")


def input_patching_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / "cmap.csv")
    if frame is None:
        return None
    inputs = frame[frame.patch != "z"]
    return _cmap_wide(inputs, inputs.set + " " + inputs.patch, "cmap_input")


def knockout_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    frame = _csv(results / "knockout.csv")
    if frame is None:
        return None
    wide = _wide(frame, ["model", "edge"], "from L" + frame.from_layer.astype(str), "accuracy", ("full_accuracy", "n"))
    return wide.rename(columns={"full_accuracy": "no knockout"})


# ---------------------------------------------------------------------------------------------
# The models and settings of the run


def _score_metadata(results: Path, name: str) -> dict[str, str]:
    """The metadata of a model's first saved path-patching step (seed, n, boxes, dtype, method)."""
    from safetensors import safe_open

    files = sorted((results / name / "path_patching").glob("*.safetensors"))
    if not files:
        return {}
    with safe_open(str(files[0]), framework="numpy") as f:
        return dict(f.metadata() or {})


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def models_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    rows = []
    for i, name in enumerate(models):
        meta = _score_metadata(results, name)
        minimality = _json(results / name / "minimality.json")
        rows.append({
            "model": name,
            "role": "base" if i == 0 else "fine-tuned",
            "paper model": paper_model(name) or "",
            **{f"path patching {k}": meta.get(k, "") for k in ("n", "seed", "boxes", "dtype", "method")},
            "top-k (A B C D)": " ".join(map(str, minimality.get("top_k", []))),
            "minimality threshold": minimality.get("threshold", ""),
            "minimality n": minimality.get("n", ""),
        })
    return pd.DataFrame(rows) if rows else None


def dcm_settings_table(results: Path, models: list[str]) -> pd.DataFrame | None:
    rows = [
        {"model": name, "base circuit": d.get("base", ""), **d.get("settings", {})}
        for name in models
        if (d := _json(results / name / "dcm.json"))
    ]
    return pd.DataFrame(rows) if rows else None


# ---------------------------------------------------------------------------------------------
# The page


@dataclass(frozen=True)
class Table:
    caption: str
    build: Callable[[Path, list[str]], pd.DataFrame | None]
    source: str  # the result file(s) it reads, relative to RESULTS
    target: str  # the make target that writes them


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    tables: tuple[Table, ...]
    figures: tuple[str, ...]  # figure stems (fnmatch patterns), in page order


SECTIONS = (
    Section("run", "Models and settings", (
        Table("The models of the run (the first is the base) and their path-patching settings",
              models_table, "<model>/path_patching, <model>/minimality.json", "circuit"),
        Table("DCM settings", dcm_settings_table, "<model>/dcm.json", "dcm"),
    ), ()),
    Section("sweep", "Where the mechanism lives: the position sweep", (
        Table("Positions whose heads carry an effect (the layer sweep's marks) and where the discovered "
              "circuit's groups act", sweep_table, "<model>/discovered/sweep.json", "circuit"),
    ), ("*_sweep",)),
    Section("circuit", "Circuit discovery and Table 1 (at the paper's positions and at the discovered ones)", (
        Table("Table 1: the base circuit on every model, at the paper's positions and at the discovered "
              "ones; slots = share of the (head, position) slots at the circuit's positions that it keeps",
              table1_table, "table1.csv", "circuit"),
        Table("Circuit size per group", sizes_table, "<model>/circuit.json, <model>/discovered/circuit.json", "circuit"),
        Table("Overlap: heads of the base circuit in each model's circuit",
              overlap_table, "overlap.csv", "circuit"),
    ), ("*_circuit", "table1", "*_path_patching", "*_completeness")),
    Section("dcm", "Figure 2: what each group encodes (DCM)", (
        Table("Accuracy (% of the desideratum's target) with each group's DCM heads patched, on the "
              "base circuit at the paper's positions, mean ± std over resamplings", figure2_table, "dcm.csv", "dcm"),
        Table("The same on the base circuit at the discovered positions", figure2_discovered_table, "dcm.csv", "dcm"),
    ), ("dcm", "dcm_discovered", "dcm_extra")),
    Section("cmap", "Figure 3: cross-model activation patching", (
        Table("Base-model accuracy with the fine-tuned model's head outputs patched in "
              "(accuracy, heads patched)", figure3_table, "cmap.csv", "cmap"),
        Table("Input patching (q, k, v of the head set)", input_patching_table, "cmap.csv", "cmap"),
    ), ("cmap", "cmap_discovered", "cmap_input", "cmap_input_discovered")),
    Section("knockout", "Attention knockout", (
        Table("Accuracy with the edge blocked from layer L on", knockout_table, "knockout.csv", "knockout"),
    ), ("knockout",)),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child { text-align: left; }
.missing { color: #a60; } .source { color: #666; font-size: 0.85em; }
.plot { overflow-x: auto; margin-bottom: 2em; }
#js-errors { color: #b00; white-space: pre-wrap; }
"""

# First thing on the page: every script error (plotly.js included) is listed in #js-errors.
ERROR_COLLECTOR = """<script>
window.reportErrors = [];
function reportError(message) {
  window.reportErrors.push(String(message));
  var box = document.getElementById("js-errors");
  if (box) { box.hidden = false; box.textContent = window.reportErrors.join("\\n"); }
}
window.addEventListener("error", function (e) { reportError(e.message + " (line " + e.lineno + ")"); });
window.addEventListener("unhandledrejection", function (e) { reportError(e.reason); });
document.addEventListener("DOMContentLoaded", function () { if (window.reportErrors.length) reportError("(above)"); });
</script>"""

PLOT_ALL = """<script>
document.querySelectorAll("script.figure-spec").forEach(function (spec) {
  try {
    var fig = JSON.parse(spec.textContent);
    Plotly.newPlot(spec.dataset.target, fig.data, fig.layout || {}, {responsive: true})
      .catch(function (e) { reportError(spec.dataset.target + ": " + e); });
  } catch (e) { reportError(spec.dataset.target + ": " + e); }
});
</script>"""


def figure_stems(figures_dir: Path) -> list[str]:
    """Every figure under `figures_dir` (its `<stem>.json`), sorted."""
    return sorted(p.stem for p in figures_dir.glob("*.json")) if figures_dir.is_dir() else []


def _model_rank(stem: str, models: list[str]) -> int:
    """The position in `models` of the model a figure is named after (`<model>_...`)."""
    return next((i for i, m in enumerate(models) if stem.startswith(m + "_")), len(models))


def place_figures(stems: list[str], models: list[str]) -> dict[str, list[str]]:
    """Section id -> its figures: in the order of its patterns, then of `models`; the figures no
    section names go to "other"."""
    placed: dict[str, list[str]] = {}
    for section in SECTIONS:
        chosen = placed.setdefault(section.id, [])
        for pattern in section.figures:
            matched = [s for s in stems if fnmatch.fnmatchcase(s, pattern) and s not in chosen]
            chosen += sorted(matched, key=lambda s: (_model_rank(s, models), s))
    taken = {s for chosen in placed.values() for s in chosen}
    placed["other"] = [s for s in stems if s not in taken]
    return placed


def _table_html(table: Table, results: Path, models: list[str]) -> str:
    source = html.escape(str(results / table.source))
    frame = table.build(results, models)
    if frame is None:
        body = f'<p class="missing">not run yet: {source} is missing (<code>make {table.target}</code>)</p>'
    elif frame.empty:
        body = f'<p class="missing">{source} has no rows for this table</p>'
    else:
        body = frame.to_html(index=False, na_rep="–", border=0, float_format="{:.4g}".format)
        body += f'<p class="source">from {source}</p>'
    return f"<h3>{html.escape(table.caption)}</h3>{body}"


def _figure_html(stem: str, figures_dir: Path) -> str:
    text = (figures_dir / f"{stem}.json").read_text(encoding="utf-8")
    json.loads(text)  # a malformed file fails here, named, rather than silently on the page
    spec = text.replace("<", "\\u003c")  # so nothing in it can close the script element
    target = f"figure-{html.escape(stem)}"
    return (f'<h3>{html.escape(stem)}</h3><div class="plot" id="{target}"></div>'
            f'<script type="application/json" class="figure-spec" data-target="{target}">{spec}</script>')


def _section_html(section: Section, shown: list[str], results: Path, figures_dir: Path, models: list[str]) -> str:
    parts = [f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>']
    parts += [_table_html(t, results, models) for t in section.tables]
    if section.figures and not shown:
        parts.append(f'<p class="missing">no figures of this stage under {html.escape(str(figures_dir))} yet</p>')
    parts += [_figure_html(s, figures_dir) for s in shown]
    return "".join(parts) + "</section>"


def discover_models(results: Path) -> list[str]:
    """The models with results: table1.csv's order (base first), else every <model>/circuit.json."""
    table = _csv(results / "table1.csv")
    if table is not None:
        return list(table.model)
    return sorted(p.parent.name for p in results.glob("*/circuit.json"))


def build(results: Path, figures_dir: Path, models: list[str] | None = None) -> str:
    """The report page of the run under `results` (result files) and `figures_dir` (figure
    JSONs); `models` in run order, base first (default: `discover_models`)."""
    from plotly.offline import get_plotlyjs

    results, figures_dir = Path(results), Path(figures_dir)
    models = list(models) if models else discover_models(results)
    stems = figure_stems(figures_dir)
    placed = place_figures(stems, models)
    sections = [*SECTIONS, *([Section("other", "Other figures", (), ())] if placed["other"] else [])]
    nav = " · ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    return "\n".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        "<title>et_circuits report</title>", ERROR_COLLECTOR, f"<style>{STYLE}</style>",
        f"<script>{get_plotlyjs()}</script></head><body>",
        '<pre id="js-errors" hidden></pre>',
        "<h1>Entity-tracking circuits: report of a run</h1>",
        f"<p>Models: {html.escape(', '.join(models) or 'none found')}. Results: {html.escape(str(results))}; "
        f"figures: {html.escape(str(figures_dir))} ({len(stems)}).</p>",
        f"<p>Columns <em>paper: …</em> hold the published numbers of the 7B model each row stands in "
        f"for (<em>paper model</em>), from {html.escape(PAPER)}.</p>",
        f"<nav>{nav}</nav>",
        *(_section_html(s, placed[s.id], results, figures_dir, models) for s in sections),
        PLOT_ALL, "</body></html>",
    ])
