"""The circuit stage's figures drawn from result types: completeness (from a real
`Completeness` on the tiny model) and the circuit diagram's arrows."""

from __future__ import annotations

from et_circuits.methods.minimality import completeness
from et_circuits.presentation import circuit_diagram, completeness_figure
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS, paper_circuit

CIRCUIT = paper_circuit(
    {
        "value_fetcher": [(1, 0), (1, 2)],
        "pos_transmitter": [(0, 3)],
        "pos_detector": [(0, 1)],
        "struct_reader": [(0, 0)],
    }
)


def test_completeness_figure_plots_every_set(predicted):
    model, batch, means = predicted
    result = completeness(model, CIRCUIT, batch, means, n_random=3, seed=0)
    fig = completeness_figure(result, "tiny: completeness")
    groups, randoms, diagonal = fig.data
    by_kind = {k: [s for s in result.sets if s.kind == k] for k in ("group", "random")}
    assert list(groups.x) == [s.model_without for s in by_kind["group"]] and len(groups.x) == 4
    assert list(groups.y) == [s.circuit_without for s in by_kind["group"]]
    assert list(groups.text) == ["A", "B", "C", "D"]
    assert list(randoms.y) == [s.circuit_without for s in by_kind["random"]] and len(randoms.y) == 3
    assert list(diagonal.x) == [0, 1] and fig.layout.title.text == "tiny: completeness"


def test_circuit_diagram_arrows_follow_the_steps():
    with_steps = circuit_diagram(CIRCUIT, steps=PAPER_STEPS, n_layers=2)
    texts = [a.text for a in with_steps.layout.annotations if a.text]
    assert texts == ["<b>Q</b>", "<b>V</b>", "<b>V</b>", "<b>logits</b>"]  # D -V-> C -V-> B -Q-> A -> logits
    assert len(with_steps.data) == 4 and with_steps.layout.title.text == "Circuit (5 heads)"
    plain = circuit_diagram(CIRCUIT)
    assert not plain.layout.annotations and len(plain.data) == 4
