"""What the paper says: which paper model a run's model stands for, and the authors' circuit
format read at the paper's positions."""

import pytest

from et_circuits.core.errors import CircuitError
from et_circuits.tasks.entity_tracking import paper


def test_paper_model_by_name():
    assert [paper.paper_model(n) for n in ("organism-llama", "goat-7b", "organism-float", "vicuna-7b", "gpt2")] == [
        "Llama-7B",
        "Goat-7B",
        "FLoat-7B",
        "Vicuna-7B",
        None,
    ]


def test_paper_circuit_is_at_the_papers_positions(tmp_path):
    circuit = paper.paper_circuit({"value_fetcher": [[1, 2]], "pos_detector": [[0, 1], [0, 3]], "struct_reader": []})
    assert circuit.positions == {
        "value_fetcher": "last",
        "pos_detector": "query_label",
        "struct_reader": "prev_query_label",
    }
    assert circuit.groups["pos_detector"] == [(0, 1), (0, 3)]
    (tmp_path / "authors.json").write_text('{"value_fetcher": [[1, 2]]}')
    assert paper.load_paper_circuit(tmp_path / "authors.json").groups == {"value_fetcher": [(1, 2)]}
    with pytest.raises(CircuitError, match="not one of the paper's groups"):
        paper.paper_circuit({"binder": [[0, 0]]})


def test_published_numbers_as_the_paper_writes_them():
    assert paper.published("table1", "Goat-7B", "faithfulness") == "0.89"
    assert paper.published("figure2", "Llama-7B", "A object_value") == "45.6"
    assert paper.published("table1", None, "full") == "" and paper.published("figure3", "Llama-7B", "A") == ""
