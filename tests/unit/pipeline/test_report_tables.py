"""The report's tables beside the paper's numbers, the page built from small synthetic result
files (`tests.report_run`), its robustness to stages not run yet, and Table 1's overlap frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from et_circuits.pipeline import report_tables as report
from et_circuits.pipeline.stages.table1 import overlap_frame
from et_circuits.tasks.entity_tracking.paper import paper_circuit
from tests.report_run import FIGURES, MODELS, write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    write_run(root / "results", root / "figures")
    return root / "results", root / "figures"


def test_tables_put_the_paper_beside_the_run(run):
    results, _ = run
    table1 = report.table1_table(results, MODELS)  # the paper's numbers beside the paper's reading only
    assert list(table1["paper: full"]) == ["0.66", "0.82", "", ""]
    assert list(table1["paper: faithfulness"]) == ["1.00", "0.89", "", ""]
    assert list(table1.positions) == ["paper", "paper", "discovered", "discovered"]
    sizes = report.sizes_table(results, MODELS).set_index(["model", "positions"])
    assert (
        sizes.loc[("organism-llama", "paper"), "A"] == "1"
        and sizes.loc[("organism-llama", "paper"), "paper: A"] == "40"
    )
    assert sizes.loc[("organism-llama", "discovered"), "binder"] == "2"
    assert sizes.loc[("organism-llama", "paper"), "binder"] == "–"  # a group this reading lacks
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
    assert (
        sweep["marked positions"] == "labels+1, last"
        and "binder (2 h): labels+1, labels+2" in sweep["discovered groups"]
    )
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


def test_overlap_frame():
    base = paper_circuit({"value_fetcher": [(1, 0), (1, 1), (2, 3)], "struct_reader": [(0, 0)]})
    other = paper_circuit({"value_fetcher": [(1, 1), (2, 3), (3, 3)], "pos_detector": [(0, 0)]})
    frame = overlap_frame(base, {"ft": other}, "discovered")
    assert frame.to_dict("records") == [
        {"model": "ft", "positions": "discovered", "group": "A", "shared": 2, "base_size": 3, "overlap": "2/3"},
        {"model": "ft", "positions": "discovered", "group": "D", "shared": 0, "base_size": 1, "overlap": "0/1"},
    ]
