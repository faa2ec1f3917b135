"""The report page end to end: the `report` command writes it from a run's files, and in a real
headless Chromium it loads without script errors and draws every figure."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from et_circuits.pipeline import cli
from et_circuits.pipeline import report_tables as report
from et_circuits.presentation import report as render
from tests.report_run import FIGURES, MODELS, write_run

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    write_run(root / "results", root / "figures")
    return root / "results", root / "figures"


def test_report_command_writes_the_page(run, tmp_path, capsys):
    results, figures = run
    out = tmp_path / "page.html"
    assert cli.main(["report", "--results", str(results), "--figures", str(figures), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert f"{len(FIGURES)} figures" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# In a real browser


def chromium() -> str:
    found = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if found is None:
        reason = "no Chromium or Chrome on PATH (make install provides it on Debian)"
        print(f"skipping the browser test: {reason}")
        pytest.skip(reason)
    return found


class Dom(HTMLParser):
    """The rendered page's plot divs, its figure captions and words for empty figures, and the
    text of its #js-errors and #layout-check boxes."""

    def __init__(self, text: str):
        super().__init__()
        self.plots, self.captions, self.empty = 0, 0, 0
        self.errors, self.layout, self._in = "", "", None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        self.plots += "js-plotly-plot" in classes
        self.captions += "caption" in classes
        self.empty += "empty" in classes
        self._in = attrs.get("id") if attrs.get("id") in ("js-errors", "layout-check") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "js-errors":
            self.errors += data
        elif self._in == "layout-check":
            self.layout += data


# Injected into a copy of the page: opens every folded group, then (once the figures are drawn)
# writes what sticks out of the 1400 px window and which legend or title text its plot cuts.
OPEN_FOLDED = 'document.querySelectorAll("details").forEach(function (d) { d.open = true; });'
LAYOUT_CHECK = (
    """<script>
"""
    + OPEN_FOLDED
    + """
window.addEventListener("load", function () { setTimeout(function () {
  var width = document.documentElement.clientWidth, wide = [], cut = [];
  document.querySelectorAll("body *").forEach(function (e) {
    if (e.parentElement && e.parentElement.closest(".table")) return;  // scrolls inside its own box
    var r = e.getBoundingClientRect();
    if (r.width > 0 && r.right > width + 1) wide.push(e.tagName + "." + e.className + " " + Math.round(r.right));
  });
  document.querySelectorAll(".js-plotly-plot").forEach(function (plot) {
    var box = plot.getBoundingClientRect();
    plot.querySelectorAll(".legendtext, .gtitle").forEach(function (t) {
      var r = t.getBoundingClientRect();
      if (r.left < box.left - 1 || r.right > box.right + 1) cut.push(plot.id + ": " + t.textContent);
    });
  });
  var out = document.createElement("pre"); out.id = "layout-check";
  out.textContent = JSON.stringify({width: width, scroll: document.documentElement.scrollWidth, wide: wide, cut: cut});
  document.body.appendChild(out);
}, 2000); });
</script>"""
)


def rendered(page: Path, tmp_path: Path) -> Dom:
    """The DOM of `page` after Chromium (a 1400 px window) has loaded it and run its scripts."""
    cmd = [
        chromium(),
        *CHROMIUM_FLAGS,
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]
    return Dom(proc.stdout)


@pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)
def test_browser_shows_every_figure_without_errors(run, tmp_path):
    results, figures = run
    page = tmp_path / "report.html"
    built = report.build(results, figures, MODELS)
    page.write_text(built, encoding="utf-8")
    folded = sum(block.count('class="figure-spec"') for block in re.findall("<details>.*?</details>", built, re.S))
    assert folded >= 1 and rendered(page, tmp_path).plots == len(FIGURES) - folded  # folded ones wait
    opened = built.replace("</body>", f"<script>{OPEN_FOLDED}</script></body>")
    page.write_text(opened, encoding="utf-8")
    dom = rendered(page, tmp_path)
    assert dom.errors == ""
    assert dom.plots == len(FIGURES)  # each folded figure is drawn when its group opens


@pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)
def test_the_page_fits_1400_px_and_cuts_no_text(run, tmp_path):
    """Nothing sticks out of a 1400 px window (wide tables scroll in their own box), no legend or
    title is cut by its plot, and every figure has a caption or, when empty, words instead."""
    results, figures = run
    page = tmp_path / "report.html"
    page.write_text(report.build(results, figures, MODELS).replace("</body>", LAYOUT_CHECK + "</body>"), "utf-8")
    dom = rendered(page, tmp_path)
    layout = json.loads(dom.layout)
    assert layout["scroll"] <= layout["width"] and layout["wide"] == [], layout
    assert layout["cut"] == [], layout["cut"]
    assert dom.errors == "" and dom.plots + dom.empty == len(FIGURES)
    assert dom.captions == dom.plots - 1  # every figure but the one the report does not know ("something_else")


@pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)
def test_browser_errors_reach_the_page(tmp_path):
    """The check above would see a failing script: the page lists every error in #js-errors."""
    page = tmp_path / "broken.html"
    page.write_text(
        f"<html><head>{render.ERROR_COLLECTOR}</head><body><pre id='js-errors' hidden></pre>"
        "<script>throw new Error('boom')</script></body></html>"
    )
    assert "boom" in rendered(page, tmp_path).errors
