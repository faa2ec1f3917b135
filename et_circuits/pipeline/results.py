"""The results layout, in one place: where every stage's files go under RESULTS/ and FIGURES/,
what they are called, and their formats (typed readers and writers, and the reuse keys that
decide whether finished work is reused). Stages, figures and the report read through here.

RESULTS/
  <model>/                    the circuit at the paper's positions (reading "paper")
    circuit.json, minimality.json, completeness.json, path_patching/<group>.safetensors
    discovered/               the same at the positions a sweep discovered, and sweep.json
    dcm.json, dcm_runs.json   DCM (per model), means-<digest>.safetensors (ablation means)
  table1.csv, table1.md, overlap.csv, dcm.csv, cmap.csv, knockout.csv
FIGURES/<stem>.{html,json,png}, report.html
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import read_json, read_tensors, write_json, write_tensors
from et_circuits.core.prompts import spec_text
from et_circuits.core.types import Receiver
from et_circuits.methods.cmap import CmapResult
from et_circuits.methods.dcm import DCMResult, SeedResult
from et_circuits.methods.discovery import ESTIMATE, Screened, Step
from et_circuits.methods.knockout import Knockout
from et_circuits.methods.path_patching import PathPatching
from et_circuits.tasks.entity_tracking.paper import letter
from et_circuits.tasks.entity_tracking.recipe import READINGS, Ask, CircuitPlan, DCMPlan, Discovery

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


# ---------------------------------------------------------------------------------------------
# DCM: dcm_runs.json (every finished training, by reuse key) and dcm.json (the summary)


# Fields of DCMConfig and DCMPlan that do not change one seed's training, so they are not in
# its reuse key: memory and speed knobs, the run's seed list (each training has its own seed),
# the bootstrap of the summary. Every other field is (a new field is, unless listed here).
RUN_KEY_IGNORES = {"inference_batch_size", "max_stacked_rows", "config", "seeds", "resamples", "resample_seed"}


def dcm_run_key(plan: DCMPlan, ask: Ask, seed: int, weights: str = "") -> str:
    """A string naming everything one seed's training depends on (for reuse across reruns):
    the ask, the seed, the model's `weights` (`weights_digest`: the weights and dtype), and
    every field of the plan and its config but `RUN_KEY_IGNORES`."""
    settings = {**asdict(plan), **asdict(plan.config)}
    return json.dumps(
        {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items() if k not in RUN_KEY_IGNORES},
            "heads": [list(h) for h in ask.heads],
            "position": ask.position,
            "desideratum": ask.desideratum,
            "seed": seed,
            "weights": weights,
        },
        sort_keys=True,
    )


def seed_to_json(result: SeedResult) -> dict:
    """One training as dcm_runs.json keeps it (accuracy: each test pair right or wrong)."""
    return {
        "heads": [list(h) for h in result.heads],
        "mask": result.mask,
        "eval_accuracy": result.eval_score,
        "test_accuracy": result.test_score,
        "test_correct": "".join("1" if v else "0" for v in result.test_values.tolist()),
        "best_step": result.best_step,
        "steps": result.steps,
        "seconds": result.seconds,
    }


def seed_from_json(d: Mapping) -> SeedResult:
    return SeedResult(
        [tuple(h) for h in d["heads"]],
        list(d["mask"]),
        d["eval_accuracy"],
        d["test_accuracy"],
        torch.tensor([float(c == "1") for c in d["test_correct"]]),
        d["best_step"],
        d["steps"],
        d.get("seconds", 0.0),
    )


def read_runs(path: Path) -> dict:
    """dcm_runs.json (key -> training), or nothing when it is missing or not JSON (a warning)."""
    if not path.exists():
        return {}
    try:
        runs = read_json(path)
    except ValueError:
        print(f"warning: {path} is not valid JSON; starting DCM afresh", file=sys.stderr)
        return {}
    return runs if isinstance(runs, dict) else {}


class RunsFile:
    """dcm_runs.json as `run_dcm`'s `finished` / `on_seed`: trainings are looked up by their
    key, and each new one is saved at once (an interrupted run resumes where it stopped)."""

    def __init__(self, path: Path, plan: DCMPlan, weights: str = ""):
        self.path, self.plan, self.weights, self.runs = path, plan, weights, read_runs(path)

    def key(self, ask: Ask, seed: int) -> str:
        return dcm_run_key(self.plan, ask, seed, self.weights)

    def finished(self, ask: Ask, seed: int) -> SeedResult | None:
        found = self.runs.get(self.key(ask, seed))
        return seed_from_json(found) if found is not None else None

    def on_seed(self, ask: Ask, seed: int, result: SeedResult) -> None:
        self.runs[self.key(ask, seed)] = seed_to_json(result)
        write_json(self.path, self.runs)

    def keep_only(self, asks) -> None:
        """Rewrite the file with the trainings of `asks` only (stale ones dropped)."""
        keys = [self.key(a, s) for a in asks for s in self.plan.seeds]
        write_json(self.path, {k: self.runs[k] for k in keys})


# dcm.json's sections: per reading of the circuit, the base model's circuit and the model's own.
SECTIONS_OF = {"paper": ("base_circuit", "own_circuit"), "discovered": ("base_discovered", "own_discovered")}
SECTIONS = tuple(s for pair in SECTIONS_OF.values() for s in pair)


def dcm_entry(result: DCMResult) -> dict:
    """One (group, desideratum) of dcm.json."""
    return {
        "heads": [list(h) for h in result.selected],
        "selected_seed": result.selected_seed,
        "accuracy": result.resampled,
        "accuracy_mean": result.mean,
        "accuracy_std": result.std,
        "test_accuracy_mean": result.test_mean,
        "test_accuracy_std": result.test_std,
        "seeds": {
            str(s): {k: v for k, v in seed_to_json(r).items() if k not in ("test_correct", "seconds")}
            for s, r in result.seeds.items()
        },
    }


def read_dcm(path: Path) -> dict:
    """A dcm.json, checked for its sections: the paper reading's two, and both or neither of
    the discovered reading's (CircuitError naming the problem)."""
    if not path.exists():
        raise CircuitError(f"no DCM result at {path}; run `make dcm` (python -m et_circuits dcm) first")
    try:
        result = read_json(path)
    except ValueError as e:
        raise CircuitError(f"{path} is not valid JSON: {e}") from None
    paper, discovered = SECTIONS_OF["paper"], SECTIONS_OF["discovered"]
    if not isinstance(result, dict) or not all(isinstance(result.get(s), dict) for s in paper):
        raise CircuitError(f"{path} is not a dcm.json (needs {' and '.join(paper)})")
    if sum(isinstance(result.get(s), dict) for s in discovered) == 1:
        raise CircuitError(f"{path} has only one of {' and '.join(discovered)}")
    return result


def readings_in(result: dict) -> list[str]:
    """The readings of the circuit (paper, discovered) a dcm.json has results for."""
    return [r for r, (base_section, _) in SECTIONS_OF.items() if base_section in result]


def selected_heads(result: dict, section: str = "own_circuit") -> dict[str, dict[str, list[tuple[int, int]]]]:
    """group -> desideratum -> the heads DCM selected on the model's own circuit (of a reading:
    `section`): the one place that reads head selections from dcm.json (what CMAP patches)."""
    try:
        groups = result[section]["groups"]
        return {
            g: {d: [(int(l), int(h)) for l, h in e["heads"]] for d, e in by_desideratum.items()}
            for g, by_desideratum in groups.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CircuitError(f"dcm.json has no valid {section!r} head selections") from None


def check_dcm_matches(circuit: Circuit, result: dict, section: str = "own_circuit") -> None:
    """CircuitError when dcm.json was computed on another version of the circuit (stale)."""
    recorded = result.get(section, {}).get("group_heads")
    if recorded is None:
        return
    try:
        recorded = {g: sorted((int(layer), int(head)) for layer, head in hs) for g, hs in recorded.items()}
    except (AttributeError, TypeError, ValueError):
        raise CircuitError("dcm.json 'group_heads' must map groups to [layer, head] pairs") from None
    if recorded != {g: sorted(hs) for g, hs in circuit.groups.items()}:
        raise CircuitError("dcm.json was computed on a different circuit than circuit.json; rerun the dcm stage")


def dcm_rows(name: str, result: dict) -> list[dict]:
    """dcm.csv's rows of one model's dcm.json (accuracies in %)."""
    rows = []
    for section in (s for s in SECTIONS if s in result):
        part = result[section]
        try:
            for group, by_desideratum in part["groups"].items():
                for desideratum, e in by_desideratum.items():
                    rows.append(
                        {
                            "model": name,
                            "circuit": section,
                            "circuit_of": part["circuit"],
                            "group": group,
                            "letter": letter(group),
                            "position": spec_text(part["positions"][group]),
                            "desideratum": desideratum,
                            "group_size": len(part["group_heads"][group]),
                            "n_selected": len(e["heads"]),
                            "heads": " ".join(f"L{l}H{h}" for l, h in e["heads"]),
                            "accuracy_mean": round(100 * e["accuracy_mean"], 2),
                            "accuracy_std": round(100 * e["accuracy_std"], 2),
                            "test_accuracy_mean": round(100 * e["test_accuracy_mean"], 2),
                            "test_accuracy_std": round(100 * e["test_accuracy_std"], 2),
                            "n_seeds": len(e["seeds"]),
                            "n_resamples": len(e["accuracy"]),
                        }
                    )
        except (KeyError, TypeError, ValueError) as err:
            raise CircuitError(f"dcm.json of {name} is malformed ({section}: {err!r})") from None
    return rows


# ---------------------------------------------------------------------------------------------
# CMAP and knockout rows


def cmap_rows(result: CmapResult, source_name: str, base_name: str, reading: str = "paper") -> list[dict]:
    """cmap.csv's rows: one per variant, with both baselines on every row; an empty set says so."""
    return [
        {
            "source": source_name,
            "base": base_name,
            "positions": reading,
            "set": v.name,
            "patch": v.patch,
            "n_heads": v.n_heads,
            "accuracy": None if value != value else round(value, 4),
            "base_accuracy": round(result.base, 4),
            "source_accuracy": round(result.source, 4),
            "n": result.n,
            "note": "no heads selected; not patched" if v.n_heads == 0 else "",
        }
        for v, value in result.variants
    ]


def knockout_rows(model_name: str, result: Knockout) -> list[dict]:
    """knockout.csv's rows: one per (edge, first blocked layer)."""
    return [
        {
            "model": model_name,
            "edge": edge,
            "from_layer": layer,
            "accuracy": round(value, 4),
            "full_accuracy": round(result.full, 4),
            "n": result.n,
        }
        for edge, values in result.curves.items()
        for layer, value in enumerate(values)
    ]
