"""Writing figures: HTML with plotly.js inlined, the figure's JSON, and a PNG (or not)."""

from __future__ import annotations

import torch

from et_circuits.presentation import circuit_diagram, save_figure, step_heatmaps
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS, paper_circuit


def test_save_figure_writes_html_and_png(tmp_path):
    scores = {s.group: torch.randn(3, 4) for s in PAPER_STEPS}
    circuit = paper_circuit(
        {"value_fetcher": [(2, 1)], "pos_transmitter": [(1, 3)], "pos_detector": [(0, 0)], "struct_reader": []}
    )
    written = save_figure(step_heatmaps(scores, circuit), "heat", tmp_path)
    assert [p.name for p in written] == ["heat.html", "heat.json", "heat.png"]
    html = written[0].read_text()
    assert "plotly" in html and "<script" in html and len(html) > 1_000_000  # plotly.js inlined
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_figure(circuit_diagram(circuit, n_layers=3), "diagram", tmp_path, png=False)
    assert (tmp_path / "diagram.html").exists() and not (tmp_path / "diagram.png").exists()
