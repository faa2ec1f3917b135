"""The report's summary and figure words, computed from a run's files: each claim's verdict
follows its stated rule, the numbers in the sentences are the files' numbers, a missing stage
is named, and figures with nothing to show are said in words."""

from __future__ import annotations

import pandas as pd
import pytest

from et_circuits.core.circuit import Circuit
from et_circuits.core.io import write_csv
from et_circuits.pipeline import report_figures, report_story
from tests.report_run import MODELS, write_run


@pytest.fixture
def run(tmp_path):
    write_run(tmp_path / "results", tmp_path / "figures")
    return tmp_path / "results"


def test_claims_follow_their_rules(run):
    same, function, improved = report_story.claims(run, MODELS)
    # Faithfulness 0.94 >= 0.8 on the fine-tuned model at the discovered positions (0.29 at the paper's).
    assert same.holds is True and "0.94" in same.run and "0.29" in same.run and same.section == "circuit"
    assert "0.97" in same.paper  # Vicuna-7B's published faithfulness
    assert function.holds is True and "A: object value 70.0 / 80.0%" in function.run
    # Goat's A heads bring the base from 0.500 to 0.680 of 0.700: 90% of the gain.
    assert improved.holds is True and "from 0.500 to 0.680" in improved.run and "90% of its gain" in improved.run


def test_a_claim_fails_by_its_rule(run):
    table = pd.read_csv(run / "table1.csv")
    table.loc[table.model == "organism-goat", "faithfulness"] = 0.5
    write_csv(run / "table1.csv", table)
    cmap = pd.read_csv(run / "cmap.csv")
    cmap["accuracy"] = cmap["accuracy"].where(cmap.accuracy.isna(), 0.55)  # 25% of the gain
    write_csv(run / "cmap.csv", cmap)
    same, _, improved = report_story.claims(run, MODELS)
    assert same.holds is False and improved.holds is False and "25% of its gain" in improved.run


def test_missing_stages_are_named(tmp_path):
    claims = report_story.claims(tmp_path, MODELS)
    assert [c.holds for c in claims] == [None, None, None]
    assert [c.run for c in claims] == [f"Not run yet (make {stage})." for stage in ("circuit", "dcm", "cmap")]


@pytest.mark.parametrize("label, position, kind", [(59.3, 8.5, "lexical"), (6.0, 36.9, "positional")])
def test_the_mechanism_is_named_from_group_b(run, label, position, kind):
    rows = pd.DataFrame(
        {
            "model": MODELS[0],
            "circuit": "base_discovered",
            "letter": "B",
            "group_size": 2,
            "desideratum": ["box_label_value", "positional"],
            "accuracy_mean": [label, position],
        }
    )
    write_csv(run / "dcm.csv", rows)
    text = report_story.mechanism(run, MODELS)
    assert text.startswith(f"The mechanism organism-llama uses is {kind}") and f"{label:.1f}%" in text
    assert text.endswith("The position sweep marks: labels+1, last.")


def test_empty_figures_are_said_in_words(run):
    Circuit({"value_fetcher": []}, {"value_fetcher": "last"}).save(run / MODELS[0] / "circuit.json")
    text = report_figures.texts(run, MODELS)
    empty = text(f"{MODELS[0]}_circuit")
    assert empty.title == "Figure 1: the organism-llama circuit at the paper's positions"
    assert empty.empty.startswith("The organism-llama circuit at the paper's positions is empty")
    drawn = text(f"{MODELS[0]}_discovered_circuit")
    assert drawn.empty is None and drawn.caption and "discovered positions" in drawn.title
    for stem in ("table1", "dcm", "dcm_discovered", "cmap", "knockout", f"{MODELS[1]}_path_patching"):
        assert text(stem).caption and text(stem).title != stem, stem
