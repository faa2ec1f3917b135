"""A two-model run in miniature for the report tests: every result file the report page reads
(small synthetic values), and a few figures (`write_run`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch

from et_circuits.core.circuit import Circuit
from et_circuits.core.io import write_csv, write_json, write_tensors
from et_circuits.presentation import save_figure
from et_circuits.tasks.entity_tracking.paper import paper_circuit

MODELS = ["organism-llama", "organism-goat"]
FIGURES = [
    "organism-llama_circuit",
    "organism-llama_path_patching",
    "organism-goat_path_patching",
    "organism-llama_sweep",
    "table1",
    "dcm",
    "dcm_discovered",
    "cmap",
    "cmap_discovered",
    "knockout",
    "something_else",
]


def write_run(results: Path, figures: Path) -> None:
    """A two-model run in miniature: every result file the report reads, and `FIGURES`."""
    circuit = paper_circuit(
        {"value_fetcher": [(1, 2)], "pos_transmitter": [(0, 1)], "pos_detector": [(0, 2)], "struct_reader": []}
    )
    for name in MODELS:
        circuit.save(results / name / "circuit.json")
        write_tensors(
            results / name / "path_patching" / "value_fetcher.safetensors",
            {"scores": torch.zeros(2, 4)},
            {"model": name, "n": "30", "seed": "0", "boxes": "7", "dtype": "float32", "method": "fast"},
        )
        write_json(results / name / "minimality.json", {"threshold": 0.0, "n": 20, "top_k": [1, 1, 1, 1]})
        write_json(
            results / name / "dcm.json", {"model": name, "base": MODELS[0], "settings": {"n_train": 8, "lam": 0.01}}
        )
        Circuit(
            {"value_fetcher": [(1, 2)], "binder": [(0, 1), (0, 3)]},
            {"value_fetcher": "last", "binder": ("labels+1", "labels+2")},
        ).save(results / name / "discovered" / "circuit.json")
    write_json(
        results / MODELS[0] / "discovered" / "sweep.json", {"n": 30, "mark": 0.2, "marked": ["labels+1", "last"]}
    )
    write_csv(
        results / "table1.csv",
        pd.DataFrame(
            {
                "model": MODELS * 2,
                "positions": ["paper"] * 2 + ["discovered"] * 2,
                "full": [0.5, 0.7] * 2,
                "circuit": [0.1, 0.2, 0.5, 0.66],
                "random": [0.0, 0.01] * 2,
                "faithfulness": [0.2, 0.29, 1.0, 0.94],
                "slots": 0.25,
            }
        ),
    )
    write_csv(
        results / "overlap.csv",
        pd.DataFrame(
            {
                "model": ["organism-goat"] * 3,
                "positions": ["paper", "paper", "discovered"],
                "group": ["A", "B", "A"],
                "shared": [1, 0, 1],
                "base_size": [1, 1, 1],
                "overlap": ["1/1", "0/1", "1/1"],
            }
        ),
    )
    write_csv(
        results / "dcm.csv",
        pd.DataFrame(
            {
                "model": MODELS * 2,
                "circuit": ["base_circuit"] * 2 + ["base_discovered"] * 2,
                "group": "value_fetcher",
                "letter": "A",
                "desideratum": "object_value",
                "accuracy_mean": [50.0, 60.0, 70.0, 80.0],
                "accuracy_std": [1.0, 2.0, 3.0, 4.0],
                "circuit_of": "organism-llama",
                "group_size": 1,
                "n_selected": 1,
            }
        ),
    )
    write_csv(
        results / "cmap.csv",
        pd.DataFrame(
            {
                "source": "organism-goat",
                "base": "organism-llama",
                "positions": ["paper"] * 3 + ["discovered"],
                "set": ["A", "C", "A", "A"],
                "patch": ["z", "z", "q", "z"],
                "n_heads": [1, 0, 1, 1],
                "accuracy": [0.66, None, 0.6, 0.68],
                "base_accuracy": 0.5,
                "source_accuracy": 0.7,
                "n": 40,
            }
        ),
    )
    write_csv(
        results / "knockout.csv",
        pd.DataFrame(
            {
                "model": "organism-llama",
                "edge": ["last->object", "last->object"],
                "from_layer": [0, 1],
                "accuracy": [0.3, 0.5],
                "full_accuracy": 0.5,
                "n": 40,
            }
        ),
    )
    for stem in FIGURES:
        save_figure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout={"title": stem}), stem, figures, png=False)
    # One figure drawn wider than the page, with a legend, as Figure 3 is for three fine-tunes:
    # the page must still fit a 1400 px window.
    wide = go.Figure([go.Bar(x=["A", "B"], y=[0.5, 0.7], name=f"patched from model {i}") for i in range(3)])
    save_figure(wide.update_layout(title="cmap", width=1800, legend=dict(orientation="h")), "cmap", figures, png=False)
