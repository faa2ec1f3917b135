"""Stages `circuit` (the paper's circuit discovery for one model), `table1` (the base circuit
evaluated on every model, and circuit overlap) and `figures` (this stage's plots).

Files, under RESULTS/:
- `<model>/path_patching/<group>.safetensors`: step scores (layer x head, tensor "scores") with
  the seed, prompt count, method and receivers as metadata; reused when they match.
- `<model>/circuit.json` (after minimality), `<model>/minimality.json` (candidates and each
  pruning test), `<model>/completeness.json`.
- `table1.csv` / `table1.md`, `overlap.csv`.
Figures (`figures`, or `table1 --figures DIR`; under --figures, default figures/): `<model>_path_patching`, `<model>_completeness`,
`<base>_circuit`, `table1`, each as .html and .png.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from et_circuits import presentation as figures
from et_circuits.core.circuit import Circuit, overlap
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import read_json, write_csv, write_json, write_tensors, write_text
from et_circuits.core.types import Receiver
from et_circuits.methods.discovery import TOP_K_CAP, Step
from et_circuits.methods.path_patching import METHODS
from et_circuits.models import result_name
from et_circuits.tasks.entity_tracking import recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS, letter

from ..args import (
    boxes,
    count,
    figures_arg,
    fraction,
    load_model,
    model_args,
    positive,
    registry_arg,
    results_arg,
    settings,
)

# ---------------------------------------------------------------------------------------------
# Path-patching score files


def _metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None  # missing, unreadable or partial: recompute


def load_scores(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """A saved step's scores and metadata (seed, n, method, receivers, ...)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("scores"), dict(f.metadata() or {})
    except FileNotFoundError:
        raise CircuitError(f"no path-patching scores at {path}") from None
    except Exception as e:
        raise CircuitError(f"{path} is not a path-patching score file: {e}") from None


def _step_meta(base: dict[str, str], step: Step, receivers: list[Receiver], method: str) -> dict[str, str]:
    """Everything a step's scores depend on, as the file's metadata (the reuse key)."""
    heads = [(r.layer, r.head) for r in receivers if r.kind == (step.receiver_kind or "")[:1]]
    return {**base, "group": step.group, "position": str(step.position), "inputs": str(step.receiver_kind),
            "method": method, "receivers": str(heads)}


def step_files(directory: Path, base_meta: dict[str, str], method: str):
    """(finished, on_step) for `find_circuit`: a step whose file is there with the same
    metadata is read back; every computed step is written to `<directory>/<group>.safetensors`."""

    def finished(step: Step, receivers: list[Receiver]):
        path = directory / f"{step.group}.safetensors"
        if _metadata(path) == _step_meta(base_meta, step, receivers, method):
            return load_scores(path)[0]
        return None

    def on_step(step: Step, receivers: list[Receiver], scores: torch.Tensor, reused: bool, seconds: float) -> None:
        if not reused:
            write_tensors(directory / f"{step.group}.safetensors", {"scores": scores}, _step_meta(base_meta, step, receivers, method))
        what = "reused" if reused else f"{seconds:.1f}s"
        print(f"{base_meta['model']} step {letter(step.group)} ({step.group}): {what}", flush=True)

    return finished, on_step


# ---------------------------------------------------------------------------------------------
# circuit


def reading_dir(results: Path, name: str, reading: str) -> Path:
    """Where a model's circuit of one reading lives: RESULTS/<model>/ for the paper's positions,
    RESULTS/<model>/discovered/ for the discovered ones."""
    return results / name if reading == "paper" else results / name / reading


def cmd_circuit(args: argparse.Namespace) -> None:
    for model_arg in args.model:  # one process for several models, each loaded once
        circuit_of(model_arg, args)
        gc.collect()


def circuit_of(model_arg: str, args: argparse.Namespace) -> None:
    """Both readings of one model's circuit, written under RESULTS/<model>/."""
    name = result_name(model_arg)
    model, tokenizer, _ = load_model(model_arg, args)
    meta = {"model": name, "seed": str(args.seed), "n": str(args.n), "boxes": str(args.boxes), "dtype": args.dtype}
    for reading in recipe.READINGS:
        out = reading_dir(args.results, name, reading)
        finished, on_step = step_files(out / "path_patching", meta, args.method)
        t0 = time.perf_counter()
        found = recipe.discover(
            model, tokenizer, reading, args.n, args.boxes, args.seed, args.top_k, args.top_k_cap, args.method,
            args.minimality_n, args.minimality_threshold, args.reference_n, args.completeness_random,
            args.sweep_n, args.mark, settings(args), finished, on_step, means_cache=args.results / name,
        )
        if found.sweep is not None:
            write_json(out / "sweep.json", {**found.sweep.to_json(), "n": args.sweep_n, "mark": args.mark})
        write_json(
            out / "minimality.json",
            {
                "threshold": args.minimality_threshold,
                "n": args.minimality_n,
                "top_k": list(found.top_k),
                "candidates": found.candidates.to_dict(),
                "tests": found.minimality,
            },
        )
        write_json(out / "completeness.json", {"n": args.minimality_n, "rows": found.completeness})
        found.circuit.save(out / "circuit.json")
        sizes = " ".join(
            f"{letter(g)}={len(found.circuit.groups[g])}/{len(found.candidates.groups[g])}" for g in found.circuit.groups
        )
        print(f"{name} ({reading} positions): circuit {sizes} (kept/top-k) | {time.perf_counter() - t0:.1f}s -> {out / 'circuit.json'}")


# ---------------------------------------------------------------------------------------------
# table1


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
            rows.append({"model": name, "positions": reading, "group": letter(group), "shared": shared,
                         "base_size": size, "overlap": f"{shared}/{size}"})
    return pd.DataFrame(rows, columns=["model", "positions", "group", "shared", "base_size", "overlap"])


TABLE1_COLUMNS = ["model", "positions", "full", "circuit", "random", "faithfulness", "slots"]


def cmd_table1(args: argparse.Namespace) -> None:
    base_name = result_name(args.base)
    names = [result_name(m) for m in args.models]
    circuits = {  # read every circuit before loading any model
        (name, reading): Circuit.load(reading_dir(args.results, name, reading) / "circuit.json")
        for name in names for reading in recipe.READINGS
    }
    rows = []
    for model_arg, name in zip(args.models, names):
        model, tokenizer, _ = load_model(model_arg, args)
        for reading in recipe.READINGS:
            ev = recipe.table1_row(
                model, tokenizer, circuits[(base_name, reading)], args.n, args.reference_n, args.random, args.boxes,
                args.seed, settings(args), means_cache=args.results / name,
            )
            rows.append({"model": name, "positions": reading, **ev.as_row()})
            print(
                f"table1 {name} ({reading} positions): full={ev.full:.2f} circuit={ev.circuit:.2f} "
                f"random={ev.random:.2f} faithfulness={ev.faithfulness:.2f} slots={ev.slots:.2f}",
                flush=True,
            )
        del model
        gc.collect()
    frame = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    write_csv(args.results / "table1.csv", frame)
    sizes = ", ".join(f"{len(circuits[(base_name, r)])} heads at the {r} positions" for r in recipe.READINGS)
    write_text(args.results / "table1.md", f"Table 1: the {base_name} circuit ({sizes}) on each model\n\n" + _markdown(frame))
    ov = pd.concat([
        overlap_frame(circuits[(base_name, r)], {n: circuits[(n, r)] for n in names if n != base_name}, r)
        for r in recipe.READINGS
    ])
    write_csv(args.results / "overlap.csv", ov)
    for (name, reading), part in ov.groupby(["model", "positions"], sort=False):
        print(f"overlap {name} ({reading}): " + ", ".join(f"{r.group} {r.overlap}" for r in part.itertuples()))
    if args.figures is not None:  # this process draws the stage's figures too (no second start)
        draw_figures(args.base, args.models, args.results, args.figures, frame)


# ---------------------------------------------------------------------------------------------
# figures


def _scores(directory: Path, circuit: Circuit) -> dict:
    """Each step's saved scores, in the circuit's group order."""
    found = {g: load_scores(directory / f"{g}.safetensors")[0] for g in circuit.groups if (directory / f"{g}.safetensors").exists()}
    if not found:
        raise CircuitError(f"no path-patching scores under {directory}; run `make circuit` first")
    return found


def figure_stem(name: str, reading: str, what: str) -> str:
    """`<model>_<what>` for the paper's positions, `<model>_discovered_<what>` for the others."""
    return f"{name}_{what}" if reading == "paper" else f"{name}_{reading}_{what}"


def cmd_figures(args: argparse.Namespace) -> None:
    table_path = args.results / "table1.csv"
    for model_arg in args.models:  # every circuit is read before table1.csv is asked for
        for reading in recipe.READINGS:
            Circuit.load(reading_dir(args.results, result_name(model_arg), reading) / "circuit.json")
    if not table_path.exists():
        raise CircuitError(f"no {table_path}; run `python -m et_circuits table1` first")
    draw_figures(args.base, args.models, args.results, args.figures, pd.read_csv(table_path))


def draw_figures(base: str, model_args: list[str], results: Path, directory: Path | None, table: pd.DataFrame) -> None:
    """The circuit stage's figures (each model's step heatmaps, completeness and sweep, the
    base's circuit diagrams, Table 1) from its files under `results` and the Table 1 frame."""
    base_name = result_name(base)
    todo = []
    for model_arg in model_args:
        name = result_name(model_arg)
        for reading in recipe.READINGS:
            where = reading_dir(results, name, reading)
            circuit = Circuit.load(where / "circuit.json")
            scores = _scores(where / "path_patching", circuit)
            label = f"{name} ({reading} positions)"
            todo.append((figure_stem(name, reading, "path_patching"), figures.step_heatmaps(scores, circuit, f"{label}: path patching")))
            if (where / "completeness.json").exists():
                rows = read_json(where / "completeness.json")["rows"]
                todo.append((figure_stem(name, reading, "completeness"), figures.completeness_figure(rows, f"{label}: completeness")))
            if (where / "sweep.json").exists():
                todo.append((f"{name}_sweep", figures.sweep_heatmap(read_json(where / "sweep.json"), f"{name}: position sweep")))
            if name == base_name:
                n_layers = next(iter(scores.values())).shape[0]
                steps = PAPER_STEPS if reading == "paper" else recipe.own_steps(_earlier(circuit))
                diagram = figures.circuit_diagram(
                    circuit, steps=steps, n_layers=n_layers, title=f"{label} circuit ({len(circuit)} heads)"
                )
                todo.append((figure_stem(name, reading, "circuit"), diagram))
    header = list(table.columns)
    cells = [[f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in table.itertuples(index=False)]
    todo.append(("table1", figures.table_figure(header, cells, f"Table 1: {base_name} circuits on each model")))
    figures.save_figures(todo, directory)
    where = directory or figures.figures_dir()
    print(f"figures: {len(todo)} written to {where}/ ({', '.join(s for s, _ in todo)})")


def _earlier(circuit: Circuit) -> list[str]:
    """The discovered circuit's positions other than the last token (what `own_steps` took)."""
    return [p for g in circuit.groups for p in circuit.positions_of(g) if p != "last"]


# ---------------------------------------------------------------------------------------------


def register(sub) -> None:
    p = sub.add_parser("circuit", help="path patching, top-k and minimality: RESULTS/<model>/circuit.json")
    p.add_argument("--model", required=True, nargs="+", help="one or more models, in turn in one process")
    results_arg(p)
    model_args(p, max_rows=True)
    p.add_argument("--n", type=positive, default=300, help="path-patching prompts (paper: 300)")
    p.add_argument("--boxes", type=boxes, default=7)
    p.add_argument(
        "--top-k", type=positive, nargs=4, default=list(recipe.PAPER_TOP_K), metavar=("A", "B", "C", "D"),
        help="heads kept per step (paper, Llama: 20 5 10 5; Goat/FLoat: 50 20 30 5)",
    )
    p.add_argument(
        "--top-k-cap", type=fraction, default=TOP_K_CAP,
        help="at most this fraction of all heads per step (only bites on small models)",
    )
    p.add_argument("--method", choices=METHODS, default="fast")
    p.add_argument("--minimality-n", type=positive, default=100, help="prompts for minimality (paper: 100)")
    p.add_argument("--minimality-threshold", type=fraction, default=0.03, help="accuracy change that counts")
    p.add_argument("--reference-n", type=positive, default=500, help="prompts for the ablation means")
    p.add_argument("--completeness-random", type=count, default=10, help="random K sets for completeness")
    p.add_argument("--sweep-n", type=positive, default=100, help="prompts of the position sweep (the first path-patching ones)")
    p.add_argument("--mark", type=fraction, default=0.2,
                   help="the sweep marks positions whose effect is at least this share of the largest")
    p.set_defaults(func=cmd_circuit)

    p = sub.add_parser("table1", help="base circuit on every model (Table 1) and circuit overlap")
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="+", required=True)
    results_arg(p)
    model_args(p)
    p.add_argument("--n", type=positive, default=500, help="evaluation prompts (paper: 500)")
    p.add_argument("--reference-n", type=positive, default=500, help="prompts for the ablation means")
    p.add_argument("--random", type=positive, default=10, help="random circuits for the baseline")
    p.add_argument("--boxes", type=boxes, default=7)
    p.add_argument("--figures", type=Path, default=None,
                   help="also draw the circuit stage's figures here, as the `figures` command does")
    p.set_defaults(func=cmd_table1)

    p = sub.add_parser("figures", help="path-patching heatmaps, circuit diagram, Table 1 figure")
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="+", required=True)
    results_arg(p)
    figures_arg(p)
    registry_arg(p)
    p.set_defaults(func=cmd_figures)
