"""Folders, file names, circuits and path-patching step files of the results layout
(`results`' module doc draws the tree)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import read_tensors, write_json, write_tensors
from et_circuits.core.types import Receiver
from et_circuits.methods.discovery import ESTIMATE, Screened, Step
from et_circuits.methods.path_patching import PathPatching
from et_circuits.tasks.entity_tracking.paper import letter
from et_circuits.tasks.entity_tracking.recipe import READINGS, CircuitPlan, Discovery

# ---------------------------------------------------------------------------------------------
# Folders and file names

READING_DIRS = {"paper": "", "discovered": "discovered"}  # RESULTS/<model>/<dir>/ per reading
STEPS_DIR = "path_patching"  # a reading's path-patching step files
CIRCUIT, MINIMALITY, COMPLETENESS, SWEEP = "circuit.json", "minimality.json", "completeness.json", "sweep.json"
DCM, DCM_RUNS = "dcm.json", "dcm_runs.json"
TABLE1, TABLE1_MD, OVERLAP = "table1.csv", "table1.md", "overlap.csv"
DCM_CSV, CMAP_CSV, KNOCKOUT_CSV = "dcm.csv", "cmap.csv", "knockout.csv"
TABLE1_COLUMNS = ["model", "positions", "full", "circuit", "random", "faithfulness", "slots"]
assert tuple(READING_DIRS) == READINGS


def reading_dir(results: Path, name: str, reading: str) -> Path:
    """Where a model's circuit of one reading lives: RESULTS/<model>/ for the paper's positions,
    RESULTS/<model>/discovered/ for the discovered ones."""
    if reading not in READING_DIRS:
        raise CircuitError(f"unknown reading {reading!r}; expected one of {', '.join(READING_DIRS)}")
    return results / name / READING_DIRS[reading] if READING_DIRS[reading] else results / name


def circuit_path(results: Path, name: str, reading: str) -> Path:
    return reading_dir(results, name, reading) / CIRCUIT


def load_circuit(results: Path, name: str, reading: str) -> Circuit:
    """A model's circuit of one reading (CircuitError saying to run the circuit stage first
    when it is not there)."""
    path = circuit_path(results, name, reading)
    if not path.exists():
        raise CircuitError(f"no circuit at {path}; run `make circuit` (python -m et_circuits circuit) first")
    return Circuit.load(path)


# ---------------------------------------------------------------------------------------------
# Figure names


def figure_stem(name: str, reading: str, what: str) -> str:
    """A model's figure: `<model>_<what>` at the paper's positions, `<model>_discovered_<what>`
    at the discovered ones."""
    return f"{name}_{what}" if reading == "paper" else f"{name}_{reading}_{what}"


def stage_stem(what: str, reading: str = "paper") -> str:
    """A stage's figure over all models: `<what>` (e.g. "cmap"), or `<what>_discovered`."""
    return what if reading == "paper" else f"{what}_{reading}"


SWEEP_FIGURE = "sweep"  # <model>_sweep: the position sweep (discovered reading)
ATTRIBUTION_FIGURE = "attribution"  # <model>[_discovered]_attribution: a screened discovery's estimates
TABLE1_FIGURE, DCM_EXTRA_FIGURE, CMAP_INPUT_FIGURE, KNOCKOUT_FIGURE = "table1", "dcm_extra", "cmap_input", "knockout"


# ---------------------------------------------------------------------------------------------
# Path-patching step files: the scores of one step, with everything they depend on as metadata


def step_path(directory: Path, group: str) -> Path:
    return directory / f"{group}.safetensors"


def step_metadata(path: Path) -> dict[str, str] | None:
    """A step file's metadata, or None where the file is missing, unreadable or partial."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


def load_scores(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """A saved step's scores and metadata (seed, n, method, receivers, ...)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("scores"), dict(f.metadata() or {})
    except FileNotFoundError:
        raise CircuitError(f"no path-patching scores at {path}") from None
    except Exception as e:
        raise CircuitError(f"{path} is not a path-patching score file: {e}") from None


def step_key(
    base: Mapping[str, str], step: Step, receivers: list[Receiver], method: str, screen: tuple[int, int] | None = None
) -> dict[str, str]:
    """Everything a step's scores depend on, as the file's metadata (the reuse key): `base`
    (model, weights digest, seed, prompt count, boxes, dtype), the step, its receivers, the method
    and, for a screened step only, `screen`: (N, attribution's gradient points)."""
    heads = [(r.layer, r.head) for r in receivers if r.kind == (step.receiver_kind or "")[:1]]
    key = {
        **base,
        "group": step.group,
        "position": str(step.position),
        "inputs": str(step.receiver_kind),
        "method": method,
        "receivers": str(heads),
    }
    if screen is not None:
        key |= {"screen": str(screen[0]), "ig_steps": str(screen[1])}
    return key


def step_files(directory: Path, base: Mapping[str, str], method: str, screen: tuple[int, int] | None = None):
    """(finished, on_step) for `find_circuit`: a step whose file is there with the same key is
    read back; every computed step is written to `<directory>/<group>.safetensors` (screened:
    the exact scores, NaN where not scored exactly, and every sender's attribution)."""

    def finished(step: Step, receivers: list[Receiver]) -> PathPatching | Screened | None:
        path = step_path(directory, step.group)
        key = step_key(base, step, receivers, method, screen)
        if step_metadata(path) != key:
            return None
        scores = load_scores(path)[0]
        n = int(key.get("n", 0))
        exact = PathPatching(scores, step.position, tuple(receivers), method=method, n=n)
        if screen is None:
            return exact
        estimate = read_tensors(path)["attribution"]
        return Screened(exact, PathPatching(estimate, step.position, tuple(receivers), method=ESTIMATE, n=n))

    def on_step(
        step: Step, receivers: list[Receiver], result: PathPatching | Screened, reused: bool, seconds: float
    ) -> None:
        if not reused:
            key = step_key(base, step, receivers, method, screen)
            tensors = (
                {"scores": result.scores}
                if not isinstance(result, Screened)
                else {
                    "scores": result.exact.scores,
                    "attribution": result.estimate.scores,
                    "exact": result.scored_exactly,
                }
            )
            write_tensors(step_path(directory, step.group), tensors, key)
        what = "reused" if reused else f"{seconds:.1f}s"
        print(f"{base['model']} step {letter(step.group)} ({step.group}): {what}", flush=True)

    return finished, on_step


def read_step_scores(directory: Path, circuit: Circuit) -> dict[str, torch.Tensor]:
    """Each step's saved scores, in the circuit's group order (CircuitError when there are none)."""
    found = {g: load_scores(step_path(directory, g))[0] for g in circuit.groups if step_path(directory, g).exists()}
    if not found:
        raise CircuitError(f"no path-patching scores under {directory}; run `make circuit` first")
    return found


def first_step_metadata(results: Path, name: str) -> dict[str, str]:
    """The metadata of a model's first saved path-patching step (seed, n, boxes, dtype, method)."""
    files = sorted((results / name / STEPS_DIR).glob("*.safetensors"))
    return step_metadata(files[0]) or {} if files else {}


# ---------------------------------------------------------------------------------------------
# What the circuit stage writes per reading


def write_discovery(out: Path, found: Discovery, plan: CircuitPlan) -> None:
    """A reading's sweep.json (discovered reading), minimality.json, completeness.json and
    circuit.json (written last: the make target)."""
    if found.sweep is not None:
        write_json(out / SWEEP, {**found.sweep.to_json(), "n": plan.sweep_n, "mark": plan.mark})
    write_json(
        out / MINIMALITY,
        {
            "threshold": plan.minimality_threshold,
            "n": plan.minimality_n,
            "top_k": list(found.top_k),
            "candidates": found.candidates.to_dict(),
            "tests": [t.to_json() for t in found.minimality.tests],
        },
    )
    write_json(out / COMPLETENESS, {"n": plan.minimality_n, "rows": found.completeness.to_json()["rows"]})
    chosen = {"method": plan.method, "screen": plan.screen, "ig_steps": plan.ig_steps if plan.screen else None}
    write_json(out / CIRCUIT, {**found.circuit.to_dict(), "chosen_by": chosen})


def read_json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
