"""The report page end to end: the `report` command writes it from a run's files, and in a real
headless Chromium it loads without script errors and draws every figure."""

from __future__ import annotations

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
    """The rendered page's plot divs and the text of its #js-errors box."""

    def __init__(self, text: str):
        super().__init__()
        self.plots, self.errors, self._in_errors = 0, "", False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.plots += "js-plotly-plot" in (attrs.get("class") or "").split()
        self._in_errors = attrs.get("id") == "js-errors"

    def handle_endtag(self, tag):
        self._in_errors = False

    def handle_data(self, data):
        if self._in_errors:
            self.errors += data


def rendered(page: Path, tmp_path: Path) -> Dom:
    """The DOM of `page` after Chromium has loaded it and run its scripts."""
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]
    return Dom(proc.stdout)


@pytest.mark.xdist_group("processes")  # starts a process: one such test at a time (make test)
def test_browser_shows_every_figure_without_errors(run, tmp_path):
    results, figures = run
    page = tmp_path / "report.html"
    page.write_text(report.build(results, figures, MODELS), encoding="utf-8")
    dom = rendered(page, tmp_path)
    assert dom.errors == ""
    assert dom.plots == len(FIGURES)


@pytest.mark.xdist_group("processes")  # starts a process: one such test at a time (make test)
def test_browser_errors_reach_the_page(tmp_path):
    """The check above would see a failing script: the page lists every error in #js-errors."""
    page = tmp_path / "broken.html"
    page.write_text(
        f"<html><head>{render.ERROR_COLLECTOR}</head><body><pre id='js-errors' hidden></pre>"
        "<script>throw new Error('boom')</script></body></html>"
    )
    assert "boom" in rendered(page, tmp_path).errors
