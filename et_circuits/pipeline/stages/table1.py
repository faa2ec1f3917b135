"""Stages `table1` (the base circuit evaluated on every model, and circuit overlap) and
`figures` (the circuit stage's plots: each model's step heatmaps, completeness and sweep, the
base's circuit diagrams, Table 1), reading and writing through `results`."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import pandas as pd

from et_circuits import presentation as figures
from et_circuits.core.circuit import Circuit, overlap
from et_circuits.core.distributed import is_writer
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import read_json, read_tensors, write_csv, write_text
from et_circuits.methods.minimality import Completeness
from et_circuits.methods.sweep import Sweep
from et_circuits.models import result_name
from et_circuits.tasks.entity_tracking import recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS, letter

from .. import results
from ..running import load_model, per_model, settings

# Estimated costs, in units of one Table 1 row of an empty circuit: each head of the evaluated
# circuit adds HEAD_COST (its ablation, its random circuits); the circuit figures (mostly PNG
# export) cost FIGURES_COST per model and reading. Measured on the organism with 1 thread: a row
# 1.2 s empty, 3.8 s with 9 heads; the figures of 4 models 7.2 s.
HEAD_COST = 0.25
FIGURES_COST = 0.75


def _markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def overlap_frame(base: Circuit, others: dict[str, Circuit], reading: str = "paper") -> pd.DataFrame:
    """Per model and group: how many of the base circuit's heads the model's circuit contains."""
    rows = []
    for name, circuit in others.items():
        for group, (shared, size) in overlap(base, circuit).items():
            rows.append(
                {
                    "model": name,
                    "positions": reading,
                    "group": letter(group),
                    "shared": shared,
                    "base_size": size,
                    "overlap": f"{shared}/{size}",
                }
            )
    return pd.DataFrame(rows, columns=["model", "positions", "group", "shared", "base_size", "overlap"])


def cmd_table1(args: argparse.Namespace) -> None:
    base_name = result_name(args.base)
    names = [result_name(m) for m in args.models]
    circuits = {  # read every circuit before loading any model (the base's too, when not a model)
        (name, reading): results.load_circuit(args.results, name, reading)
        for name in dict.fromkeys([base_name, *names])
        for reading in recipe.READINGS
    }
    plan = recipe.CircuitPlan(
        n_boxes=args.boxes, seed=args.seed, reference_n=args.reference_n, evaluation_n=args.n, n_random=args.random
    )

    loaded: dict[str, tuple] = {}  # the model of the last unit (a rank's units come in order)

    def rows_of(unit: tuple[str, str] | None) -> list[dict]:
        if unit is None:  # the circuit stage's figures but Table 1's: a unit of work of their own
            figures.save_figures(circuit_figures(args.base, args.models, args.results), args.figures)
            return []
        model_arg, reading = unit
        if model_arg not in loaded:
            loaded.clear()
            gc.collect()
            loaded[model_arg] = load_model(model_arg, args)[:2]
        model, tokenizer = loaded[model_arg]
        name = result_name(model_arg)
        ev = recipe.table1_row(
            model,
            tokenizer,
            circuits[(base_name, reading)],
            plan,
            settings=settings(args),
            means_cache=args.results / name,
        )
        print(
            f"table1 {name} ({reading} positions): full={ev.full:.2f} circuit={ev.circuit:.2f} "
            f"random={ev.random:.2f} faithfulness={ev.faithfulness:.2f} slots={ev.slots:.2f}",
            flush=True,
        )
        return [{"model": name, "positions": reading, **ev.as_row()}]

    # under torchrun: each model x reading (and the figures) on one rank, balanced by estimated cost
    units = [(m, r) for m in args.models for r in recipe.READINGS]
    costs = [1.0 + HEAD_COST * len(circuits[(base_name, r)]) for _, r in units]
    if args.figures is not None:
        units, costs = [*units, None], [*costs, FIGURES_COST * len(units)]
    rows = [row for part in per_model(rows_of, units, costs) for row in part]
    loaded.clear()
    frame = pd.DataFrame(rows, columns=results.TABLE1_COLUMNS)
    write_csv(args.results / results.TABLE1, frame)
    sizes = ", ".join(f"{len(circuits[(base_name, r)])} heads at the {r} positions" for r in recipe.READINGS)
    write_text(
        args.results / results.TABLE1_MD,
        f"Table 1: the {base_name} circuit ({sizes}) on each model\n\n" + _markdown(frame),
    )
    ov = pd.concat(
        [
            overlap_frame(circuits[(base_name, r)], {n: circuits[(n, r)] for n in names if n != base_name}, r)
            for r in recipe.READINGS
        ]
    )
    write_csv(args.results / results.OVERLAP, ov)
    for (name, reading), part in ov.groupby(["model", "positions"], sort=False):
        print(f"overlap {name} ({reading}): " + ", ".join(f"{r.group} {r.overlap}" for r in part.itertuples()))
    if args.figures is not None:  # this process draws the stage's figures too (no second start)
        figures.save_figures([table1_figure(base_name, frame)], args.figures)
        if is_writer():
            print(f"figures: written to {args.figures}/")


def cmd_figures(args: argparse.Namespace) -> None:
    table_path = args.results / results.TABLE1
    for model_arg in args.models:  # every circuit is read before table1.csv is asked for
        for reading in recipe.READINGS:
            results.load_circuit(args.results, result_name(model_arg), reading)
    if not table_path.exists():
        raise CircuitError(f"no {table_path}; run `python -m et_circuits table1` first")
    draw_figures(args.base, args.models, args.results, args.figures, pd.read_csv(table_path))


def draw_figures(
    base: str, model_args: list[str], results_dir: Path, directory: Path | None, table: pd.DataFrame
) -> None:
    """The circuit stage's figures (each model's step heatmaps, completeness and sweep, the
    base's circuit diagrams, Table 1) from its files under `results_dir` and the Table 1 frame."""
    todo = circuit_figures(base, model_args, results_dir) + [table1_figure(result_name(base), table)]
    figures.save_figures(todo, directory)
    where = directory or figures.figures_dir()
    print(f"figures: {len(todo)} written to {where}/ ({', '.join(s for s, _ in todo)})")


def circuit_figures(base: str, model_args: list[str], results_dir: Path) -> list[tuple[str, object]]:
    """(stem, figure) of each model's step heatmaps, completeness and sweep, and the base's
    circuit diagrams, from the circuit stage's files under `results_dir`."""
    base_name = result_name(base)
    todo = []
    for model_arg in model_args:
        name = result_name(model_arg)
        for reading in recipe.READINGS:
            where = results.reading_dir(results_dir, name, reading)
            circuit = Circuit.load(where / results.CIRCUIT)
            scores = results.read_step_scores(where / results.STEPS_DIR, circuit)
            label = f"{name} ({reading} positions)"
            heatmaps = figures.step_heatmaps(scores, circuit, f"{label}: path patching")
            todo.append((results.figure_stem(name, reading, "path_patching"), heatmaps))
            if (where / results.COMPLETENESS).exists():
                complete = Completeness.from_json(read_json(where / results.COMPLETENESS))
                stem = results.figure_stem(name, reading, "completeness")
                todo.append((stem, figures.completeness_figure(complete, f"{label}: completeness")))
            if (where / results.SWEEP).exists():
                found = Sweep.from_json(read_json(where / results.SWEEP))
                stem = results.figure_stem(name, "paper", results.SWEEP_FIGURE)
                todo.append((stem, figures.sweep_heatmap(found, f"{name}: position sweep")))
            pairs = _attribution_pairs(where / results.STEPS_DIR, circuit)
            if name == base_name and pairs:
                stem = results.figure_stem(name, reading, results.ATTRIBUTION_FIGURE)
                chosen = read_json(where / results.MINIMALITY) if (where / results.MINIMALITY).exists() else {}
                groups = Circuit.from_dict(chosen["candidates"]) if "candidates" in chosen else circuit
                todo.append((stem, figures.attribution_scatter(pairs, groups, f"{label}: attribution vs exact")))
            if name == base_name:
                n_layers = next(iter(scores.values())).shape[0]
                steps = PAPER_STEPS if reading == "paper" else recipe.own_steps(_earlier(circuit))
                diagram = figures.circuit_diagram(
                    circuit, steps=steps, n_layers=n_layers, title=f"{label} circuit ({len(circuit)} heads)"
                )
                todo.append((results.figure_stem(name, reading, "circuit"), diagram))
    return todo


def table1_figure(base_name: str, table: pd.DataFrame) -> tuple[str, object]:
    """(stem, figure) of Table 1."""
    header = list(table.columns)
    cells = [[f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in table.itertuples(index=False)]
    return results.TABLE1_FIGURE, figures.table_figure(header, cells, f"Table 1: {base_name} circuits on each model")


def _attribution_pairs(directory: Path, circuit: Circuit) -> dict:
    """Each screened step's (attribution, exact scores) from its step file; empty unless screened."""
    pairs = {}
    for group in circuit.groups:
        path = results.step_path(directory, group)
        tensors = read_tensors(path) if path.exists() else {}
        if "attribution" in tensors:
            pairs[group] = (tensors["attribution"], tensors["scores"])
    return pairs


def _earlier(circuit: Circuit) -> list[str]:
    """The discovered circuit's positions other than the last token (what `own_steps` took)."""
    return [p for g in circuit.groups for p in circuit.positions_of(g) if p != "last"]
