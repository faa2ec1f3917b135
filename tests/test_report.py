"""The report page, from small synthetic result files and figures made here: its tables beside
the paper's numbers, its robustness to stages not run yet, and, in a real headless Chromium, that
it loads without script errors and draws every figure."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from et_circuits.pipeline import cli, report_tables as report
from et_circuits.core.circuit import Circuit
from et_circuits.presentation import save_figure
from et_circuits.core.io import write_csv, write_json, write_tensors
from et_circuits.tasks.entity_tracking.paper import paper_circuit
from et_circuits.presentation import report as render
from et_circuits.tasks.entity_tracking import paper

MODELS = ["organism-llama", "organism-goat"]
FIGURES = ["organism-llama_circuit", "organism-llama_path_patching", "organism-goat_path_patching",
           "organism-llama_sweep", "table1", "dcm", "dcm_discovered", "cmap", "cmap_discovered", "knockout",
           "something_else"]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=20000",
]


def write_run(results: Path, figures: Path) -> None:
    """A two-model run in miniature: every result file the report reads, and `FIGURES`."""
    circuit = paper_circuit({"value_fetcher": [(1, 2)], "pos_transmitter": [(0, 1)], "pos_detector": [(0, 2)],
                       "struct_reader": []})
    for name in MODELS:
        circuit.save(results / name / "circuit.json")
        write_tensors(results / name / "path_patching" / "value_fetcher.safetensors", {"scores": torch.zeros(2, 4)},
                      {"model": name, "n": "30", "seed": "0", "boxes": "7", "dtype": "float32", "method": "fast"})
        write_json(results / name / "minimality.json", {"threshold": 0.0, "n": 20, "top_k": [1, 1, 1, 1]})
        write_json(results / name / "dcm.json", {"model": name, "base": MODELS[0], "settings": {"n_train": 8, "lam": 0.01}})
        Circuit({"value_fetcher": [(1, 2)], "binder": [(0, 1), (0, 3)]}, {"value_fetcher": "last", "binder": ("labels+1", "labels+2")}).save(
            results / name / "discovered" / "circuit.json")
    write_json(results / MODELS[0] / "discovered" / "sweep.json", {"n": 30, "mark": 0.2, "marked": ["labels+1", "last"]})
    write_csv(results / "table1.csv", pd.DataFrame(
        {"model": MODELS * 2, "positions": ["paper"] * 2 + ["discovered"] * 2, "full": [0.5, 0.7] * 2,
         "circuit": [0.1, 0.2, 0.5, 0.66], "random": [0.0, 0.01] * 2, "faithfulness": [0.2, 0.29, 1.0, 0.94],
         "slots": 0.25}))
    write_csv(results / "overlap.csv", pd.DataFrame(
        {"model": ["organism-goat"] * 3, "positions": ["paper", "paper", "discovered"], "group": ["A", "B", "A"],
         "shared": [1, 0, 1], "base_size": [1, 1, 1], "overlap": ["1/1", "0/1", "1/1"]}))
    write_csv(results / "dcm.csv", pd.DataFrame({
        "model": MODELS * 2, "circuit": ["base_circuit"] * 2 + ["base_discovered"] * 2, "group": "value_fetcher",
        "letter": "A", "desideratum": "object_value", "accuracy_mean": [50.0, 60.0, 70.0, 80.0],
        "accuracy_std": [1.0, 2.0, 3.0, 4.0]}))
    write_csv(results / "cmap.csv", pd.DataFrame({
        "source": "organism-goat", "base": "organism-llama", "positions": ["paper"] * 3 + ["discovered"],
        "set": ["A", "C", "A", "A"], "patch": ["z", "z", "q", "z"], "n_heads": [1, 0, 1, 1],
        "accuracy": [0.66, None, 0.6, 0.68], "base_accuracy": 0.5, "source_accuracy": 0.7, "n": 40}))
    write_csv(results / "knockout.csv", pd.DataFrame({
        "model": "organism-llama", "edge": ["last->object", "last->object"], "from_layer": [0, 1],
        "accuracy": [0.3, 0.5], "full_accuracy": 0.5, "n": 40}))
    for stem in FIGURES:
        save_figure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout={"title": stem}), stem, figures, png=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    write_run(root / "results", root / "figures")
    return root / "results", root / "figures"


def test_paper_model_by_name():
    assert [paper.paper_model(n) for n in ("organism-llama", "goat-7b", "organism-float", "vicuna-7b", "gpt2")] == [
        "Llama-7B", "Goat-7B", "FLoat-7B", "Vicuna-7B", None]


def test_tables_put_the_paper_beside_the_run(run):
    results, _ = run
    table1 = report.table1_table(results, MODELS)  # the paper's numbers beside the paper's reading only
    assert list(table1["paper: full"]) == ["0.66", "0.82", "", ""]
    assert list(table1["paper: faithfulness"]) == ["1.00", "0.89", "", ""]
    assert list(table1.positions) == ["paper", "paper", "discovered", "discovered"]
    sizes = report.sizes_table(results, MODELS).set_index(["model", "positions"])
    assert sizes.loc[("organism-llama", "paper"), "A"] == 1 and sizes.loc[("organism-llama", "paper"), "paper: A"] == "40"
    assert sizes.loc[("organism-llama", "discovered"), "binder"] == 2
    assert "binder: labels+1, labels+2" in sizes.loc[("organism-llama", "discovered"), "acting at"]
    overlap = report.overlap_table(results, MODELS)
    assert list(overlap["paper: A"]) == ["27/40", ""] and list(overlap.positions) == ["paper", "discovered"]
    fig2 = report.figure2_table(results, MODELS).set_index("group desideratum")
    assert fig2.loc["A object_value", "organism-goat"] == "60.0 ± 2.0"
    assert fig2.loc["A object_value", "paper: Goat-7B"] == "65.9"
    fig2d = report.figure2_discovered_table(results, MODELS).set_index("group desideratum")
    assert fig2d.loc["A object_value", "organism-goat"] == "80.0 ± 4.0" and "paper: Goat-7B" not in fig2d
    fig3 = report.figure3_table(results, MODELS)
    assert list(fig3.positions) == ["paper", "discovered"]
    assert fig3.iloc[0]["A"] == "0.660 (1 h)" and fig3.iloc[0]["C"] == "– (0 h)" and fig3.iloc[0]["paper: A"] == "0.82"
    assert fig3.iloc[1]["A"] == "0.680 (1 h)" and fig3.iloc[1]["paper: A"] == ""
    sweep = report.sweep_table(results, MODELS).iloc[0]
    assert sweep["marked positions"] == "labels+1, last" and "binder (2 h): labels+1, labels+2" in sweep["discovered groups"]
    assert report.input_patching_table(results, MODELS).iloc[0]["paper: A q"] == "0.77"
    assert list(report.knockout_table(results, MODELS).columns[-2:]) == ["from L0", "from L1"]


def test_page_embeds_plotly_once_and_every_figure(run):
    results, figures = run
    page = report.build(results, figures, MODELS)
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:500]) == 1
    assert page.count('class="figure-spec"') == len(FIGURES)
    assert "Other figures" in page and "not run yet" not in page
    assert "n_train" in page and "float32" in page  # the run's settings


def test_page_names_what_is_missing(tmp_path):
    page = report.build(tmp_path / "results", tmp_path / "figures", ["organism-llama"])
    for name in ("table1.csv", "overlap.csv", "dcm.csv", "cmap.csv", "knockout.csv"):
        assert f"{tmp_path / 'results' / name} is missing" in page
    assert "<code>make cmap</code>" in page and 'class="figure-spec"' not in page


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


def test_browser_shows_every_figure_without_errors(run, tmp_path):
    results, figures = run
    page = tmp_path / "report.html"
    page.write_text(report.build(results, figures, MODELS), encoding="utf-8")
    dom = rendered(page, tmp_path)
    assert dom.errors == ""
    assert dom.plots == len(FIGURES)


def test_browser_errors_reach_the_page(tmp_path):
    """The check above would see a failing script: the page lists every error in #js-errors."""
    page = tmp_path / "broken.html"
    page.write_text(f"<html><head>{render.ERROR_COLLECTOR}</head><body><pre id='js-errors' hidden></pre>"
                    "<script>throw new Error('boom')</script></body></html>")
    assert "boom" in rendered(page, tmp_path).errors
