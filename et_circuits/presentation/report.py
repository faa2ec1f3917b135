"""The report page: one self-contained HTML file (plotly.js inlined once, no network) that opens
with a summary (each claim of the study beside what the run found), then sections of tables
(pandas frames) and figures (plotly JSON files), each figure with a title and a one-line
caption. A figure with nothing to show is said in words; the figures of the models after the
first are folded away; a table not built yet names the make target that builds it. The page
fits a 1400 px window: figures take the page's width, wide tables scroll inside themselves."""

from __future__ import annotations

import fnmatch
import html
import json
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Claim:
    """A line of the summary: a claim, the published finding, this run's finding, whether the
    run supports it (None: not run yet) and the section holding the evidence."""

    title: str
    paper: str
    run: str
    holds: bool | None
    section: str


@dataclass(frozen=True)
class FigureText:
    """How a figure is shown: its title, a one-line caption saying what to look for, and, when
    it has nothing to show, the sentence said instead of drawing it."""

    title: str
    caption: str = ""
    empty: str | None = None


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child { text-align: left; }
.table { overflow-x: auto; max-width: 100%; margin-bottom: 1.5em; }
.missing, .empty { color: #a60; } .source, .caption { color: #555; font-size: 0.9em; }
.plot { width: 100%; margin-bottom: 0.3em; }
.summary td, .summary th { text-align: left; vertical-align: top; }
.holds { color: #276627; font-weight: bold; } .fails { color: #a11; font-weight: bold; } .open { color: #a60; }
details { margin: 1em 0 2em; } summary { cursor: pointer; font-weight: bold; }
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

# Figures take the width of the page (their own width is dropped) and follow it; a folded group
# is drawn when opened.
PLOT_ALL = """<script>
function plot(spec) {
  try {
    var fig = JSON.parse(spec.textContent), layout = fig.layout || {};
    delete layout.width; layout.autosize = true;
    Plotly.newPlot(spec.dataset.target, fig.data, layout, {responsive: true})
      .catch(function (e) { reportError(spec.dataset.target + ": " + e); });
  } catch (e) { reportError(spec.dataset.target + ": " + e); }
}
document.querySelectorAll("script.figure-spec").forEach(function (spec) {
  var folded = spec.closest("details");
  if (!folded) { plot(spec); return; }
  folded.addEventListener("toggle", function () {
    if (folded.open && !spec.dataset.drawn) { spec.dataset.drawn = "1"; plot(spec); }
  });
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


def _number(x) -> str:
    return f"{x:.3f}"


def _table_html(table: Table) -> str:
    source = html.escape(table.source)
    frame = table.frame
    if frame is None:
        body = f'<p class="missing">not run yet: {source} is missing (<code>make {table.target}</code>)</p>'
    elif frame.empty:
        body = f'<p class="missing">{source} has no rows for this table</p>'
    else:
        body = '<div class="table">' + frame.to_html(index=False, na_rep="–", border=0, float_format=_number)
        body += f'</div><p class="source">from {source}</p>'
    return f"<h3>{html.escape(table.caption)}</h3>{body}"


def _figure_html(stem: str, figures_dir: Path, text: FigureText) -> str:
    heading = f'<h3 id="fig-{html.escape(stem)}">{html.escape(text.title)}</h3>'
    if text.empty is not None:
        return f'{heading}<p class="empty">{html.escape(text.empty)}</p>'
    spec = (figures_dir / f"{stem}.json").read_text(encoding="utf-8")
    json.loads(spec)  # a malformed file fails here, named, rather than silently on the page
    spec = spec.replace("<", "\\u003c")  # so nothing in it can close the script element
    target = f"figure-{html.escape(stem)}"
    caption = f'<p class="caption">{html.escape(text.caption)}</p>' if text.caption else ""
    return (
        f'{heading}<div class="plot" id="{target}"></div>{caption}'
        f'<script type="application/json" class="figure-spec" data-target="{target}">{spec}</script>'
    )


def _section_html(
    section: Section, shown: list[str], figures_dir: Path, models: list[str], text: Callable[[str], FigureText]
) -> str:
    parts = [f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>']
    parts += [_table_html(t) for t in section.tables]
    if section.figures and not shown:
        parts.append(f'<p class="missing">no figures of this stage under {html.escape(str(figures_dir))} yet</p>')
    first = [s for s in shown if _model_rank(s, models) in (0, len(models))]  # the base model's, and the stage's
    later = [s for s in shown if s not in first]
    parts += [_figure_html(s, figures_dir, text(s)) for s in first]
    if later:
        inner = "".join(_figure_html(s, figures_dir, text(s)) for s in later)
        parts.append(
            f"<details><summary>The same for the other models ({len(later)} figures)</summary>{inner}</details>"
        )
    return "".join(parts) + "</section>"


def _summary_html(claims: Sequence[Claim], mechanism: str) -> str:
    if not claims and not mechanism:
        return ""
    verdict = {True: ("holds", "holds"), False: ("fails", "does not hold"), None: ("open", "not run yet")}
    rows = "".join(
        f'<tr><td><a href="#{c.section}">{html.escape(c.title)}</a><br>'
        f'<span class="{verdict[c.holds][0]}">{verdict[c.holds][1]}</span></td>'
        f"<td>{html.escape(c.paper)}</td><td>{html.escape(c.run)}</td></tr>"
        for c in claims
    )
    table = (
        '<div class="table"><table class="summary"><tr><th>claim</th><th>the paper</th><th>this run</th></tr>'
        f"{rows}</table></div>"
    )
    return f'<section id="summary"><h2>Summary</h2><p>{html.escape(mechanism)}</p>{table}</section>'


def render_page(
    title: str,
    intro: tuple[str, ...],
    sections: list[Section],
    figures_dir: Path,
    models: list[str],
    *,
    claims: Sequence[Claim] = (),
    mechanism: str = "",
    figure_text: Callable[[str], FigureText] = FigureText,
) -> str:
    """The page: `title`, the `intro` paragraphs (HTML), the summary (`claims`, `mechanism`), a
    navigation bar, then each section's tables and its figures from `figures_dir` (every figure
    there; those no section names under "Other figures"), shown as `figure_text(stem)` says."""
    from plotly.offline import get_plotlyjs

    figures_dir = Path(figures_dir)
    placed = place_figures(figure_stems(figures_dir), models, sections)
    sections = [*sections, *([Section("other", "Other figures", (), ())] if placed["other"] else [])]
    links = [("summary", "Summary")] if claims or mechanism else []
    nav = " · ".join(f'<a href="#{i}">{html.escape(t)}</a>' for i, t in [*links, *((s.id, s.title) for s in sections)])
    return "\n".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>et_circuits report</title>",
            ERROR_COLLECTOR,
            f"<style>{STYLE}</style>",
            f"<script>{get_plotlyjs()}</script></head><body>",
            '<pre id="js-errors" hidden></pre>',
            f"<h1>{html.escape(title)}</h1>",
            *(f"<p>{p}</p>" for p in intro),
            f"<nav>{nav}</nav>",
            _summary_html(claims, mechanism),
            *(_section_html(s, placed[s.id], figures_dir, models, figure_text) for s in sections),
            PLOT_ALL,
            "</body></html>",
        ]
    )
