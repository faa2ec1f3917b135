"""DCM's files: dcm_runs.json (every finished mask training, by its reuse key) and dcm.json
(the summary per model), with dcm.csv's rows."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from et_circuits.core.circuit import Circuit
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import read_json, write_json
from et_circuits.core.prompts import spec_text
from et_circuits.methods.dcm import DCMResult, SeedResult
from et_circuits.tasks.entity_tracking.paper import letter
from et_circuits.tasks.entity_tracking.recipe import Ask, DCMPlan

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
