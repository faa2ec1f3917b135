"""The report page: one self-contained HTML file (plotly.js inlined once, no network) with
sections of tables (pandas frames) and figures (plotly JSON files). A table not built yet is
named on the page with the make target that builds it, not an error."""

from __future__ import annotations

import fnmatch
import html
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Table:
    """A table on the page: its caption, its frame (None: not run yet), the file it is read from
    and the make target that writes it."""

    caption: str
    frame: pd.DataFrame | None
    source: str
    target: str


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    tables: tuple[Table, ...]
    figures: tuple[str, ...]  # figure stems (fnmatch patterns), in page order


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


def place_figures(stems: list[str], models: list[str], sections) -> dict[str, list[str]]:
    """Section id -> its figures: in the order of its patterns, then of `models`; the figures no
    section names go to "other"."""
    placed: dict[str, list[str]] = {}
    for section in sections:
        chosen = placed.setdefault(section.id, [])
        for pattern in section.figures:
            matched = [s for s in stems if fnmatch.fnmatchcase(s, pattern) and s not in chosen]
            chosen += sorted(matched, key=lambda s: (_model_rank(s, models), s))
    taken = {s for chosen in placed.values() for s in chosen}
    placed["other"] = [s for s in stems if s not in taken]
    return placed


def _table_html(table: Table) -> str:
    source = html.escape(table.source)
    frame = table.frame
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
    return (
        f'<h3>{html.escape(stem)}</h3><div class="plot" id="{target}"></div>'
        f'<script type="application/json" class="figure-spec" data-target="{target}">{spec}</script>'
    )


def _section_html(section: Section, shown: list[str], figures_dir: Path) -> str:
    parts = [f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>']
    parts += [_table_html(t) for t in section.tables]
    if section.figures and not shown:
        parts.append(f'<p class="missing">no figures of this stage under {html.escape(str(figures_dir))} yet</p>')
    parts += [_figure_html(s, figures_dir) for s in shown]
    return "".join(parts) + "</section>"


def render_page(
    title: str, intro: tuple[str, ...], sections: list[Section], figures_dir: Path, models: list[str]
) -> str:
    """The page: `title`, the `intro` paragraphs (HTML), a navigation bar, then each section's
    tables and its figures from `figures_dir` (every figure there; those no section names under
    "Other figures")."""
    from plotly.offline import get_plotlyjs

    figures_dir = Path(figures_dir)
    placed = place_figures(figure_stems(figures_dir), models, sections)
    sections = [*sections, *([Section("other", "Other figures", (), ())] if placed["other"] else [])]
    nav = " · ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    return "\n".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            "<title>et_circuits report</title>",
            ERROR_COLLECTOR,
            f"<style>{STYLE}</style>",
            f"<script>{get_plotlyjs()}</script></head><body>",
            '<pre id="js-errors" hidden></pre>',
            f"<h1>{html.escape(title)}</h1>",
            *(f"<p>{p}</p>" for p in intro),
            f"<nav>{nav}</nav>",
            *(_section_html(s, placed[s.id], figures_dir) for s in sections),
            PLOT_ALL,
            "</body></html>",
        ]
    )
