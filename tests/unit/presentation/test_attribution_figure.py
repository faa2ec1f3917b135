"""The screened discovery's scatter: one panel per step with the senders scored both ways (the
screened-out, NaN in the exact scores, are not drawn), the group's heads filled, and the
Spearman correlation in each panel's title; the report's caption says which method chose."""

from __future__ import annotations

import torch

from et_circuits.core.agreement import spearman
from et_circuits.core.circuit import Circuit
from et_circuits.core.io import write_json
from et_circuits.pipeline import report_figures
from et_circuits.presentation import attribution_scatter


def test_scatter_draws_the_senders_scored_both_ways():
    g = torch.Generator().manual_seed(0)
    estimate = torch.randn(4, 4, generator=g)
    exact = estimate + 0.5 * torch.randn(4, 4, generator=g)
    exact[3] = float("nan")  # screened out
    circuit = Circuit({"value_fetcher": [(1, 2), (0, 0)]}, {"value_fetcher": "last"})
    fig = attribution_scatter({"value_fetcher": (estimate, exact)}, circuit, "t")
    chosen, others = (next(t for t in fig.data if t.marker.symbol == s) for s in ("circle", "circle-open"))
    assert sorted(chosen.text) == ["L0H0", "L1H2"] and len(others.x) == 10
    assert f"ρ = {spearman(estimate, exact):+.2f} (12 senders)" in fig.layout.annotations[0].text


def test_caption_says_which_method_chose(tmp_path):
    model = "m"
    (tmp_path / model).mkdir()
    circuit = {"groups": {"a": [[0, 1]]}, "positions": {"a": "last"}}
    write_json(tmp_path / model / "circuit.json", {**circuit, "chosen_by": {"method": "fast", "screen": 8}})
    text = report_figures.texts(tmp_path, [model])(f"{model}_attribution")
    assert "among the 8 senders per step that attribution ranked first" in text.caption
    write_json(tmp_path / model / "circuit.json", {**circuit, "chosen_by": {"method": "fast", "screen": None}})
    assert "scored every sender" in report_figures.texts(tmp_path, [model])(f"{model}_attribution").caption


def test_a_step_without_senders_scored_both_ways_says_so():
    nan = torch.full((2, 2), float("nan"))
    circuit = Circuit({"a": [], "b": []}, {"a": "last", "b": "last"})
    fig = attribution_scatter({"a": (torch.zeros(2, 2), torch.zeros(2, 2)), "b": (nan, nan)}, circuit)
    notes = [a.text for a in fig.layout.annotations]
    assert notes.count("no sender scored both ways") == 1 and len([t for t in fig.data if len(t.x)]) == 1
