"""Reuse keys, property-tested: a rerun reuses a finished result exactly when what computes it
is unchanged. Path-patching steps (the circuit stage, both readings, the position sweep's
positions included), DCM trainings (the dcm stage and dcm_run_key) and the ablation means. The
parameters varied are read off the parser and the dataclasses, so that a new one is covered;
the few that cannot change a result are listed, each with its reason."""

from __future__ import annotations

import inspect
import shutil
from types import SimpleNamespace

import pytest
import torch

from et_circuits import models
from et_circuits.methods import discovery
from et_circuits.methods import path_patching as pp
from et_circuits.pipeline import cli, results, running
from et_circuits.pipeline.stages import circuit as circuit_stage
from et_circuits.tasks.entity_tracking.recipe import circuits as recipe_circuits
from tests import stage_options
from tests.digest import digest

# path_patch's parameters that cannot change its scores: the run settings (batch size, rows
# per pass, progress) and the prepared runs (made from the same model and prompts).
PATH_PATCH_IGNORES = {"settings", "runs"}
# circuit options a step's reuse is not asked about: another model or results folder holds
# no earlier step; one CPU here (device placement is checked by the GPU checks); the registry
# only names models.
STEP_OPTIONS_NOT_VARIED = {"models", "results", "device", "n_devices", "registry"}


def fake_path_patch(model, *args, **kwargs) -> pp.PathPatching:
    """Scores that are a function of every argument of path_patch that can change them."""
    bound = inspect.signature(pp.path_patch).bind(model, *args, **kwargs)
    bound.apply_defaults()
    used = {k: v for k, v in bound.arguments.items() if k not in PATH_PATCH_IGNORES}
    seed = int(digest(used)[:12], 16)
    scores = torch.rand(model.cfg.n_layers, model.cfg.n_heads, generator=torch.Generator().manual_seed(seed))
    receivers = tuple(bound.arguments["receivers"] or ())
    return pp.PathPatching(scores, bound.arguments["sender_position"], receivers, n=len(bound.arguments["clean"]))


@pytest.fixture
def circuit_run(checkpoints, monkeypatch):
    """Runs the circuit stage on one model with path patching faked (`fake_path_patch`) and the
    rest of discovery faked too (the sweep by its inputs' digest); returns each reading's (scores, reused groups)."""
    loaded, real_load = {}, models.load

    def load(name, device=None, dtype=None, n_devices=1):  # each checkpoint and dtype loaded once
        if (str(name), dtype) not in loaded:
            loaded[(str(name), dtype)] = real_load(name, device=device, dtype=dtype)
        return loaded[(str(name), dtype)]

    monkeypatch.setattr(running.models, "load", load)
    monkeypatch.setattr(discovery, "path_patch", fake_path_patch)
    monkeypatch.setattr(discovery, "prepare_runs", lambda *a, **k: None)
    monkeypatch.setattr(recipe_circuits, "sweep", _fake_sweep)
    monkeypatch.setattr(recipe_circuits, "smallest", _fake_smallest)
    monkeypatch.setattr(recipe_circuits, "position_means", lambda *a, **k: None)
    monkeypatch.setattr(recipe_circuits, "minimal", lambda circuit, *a, **k: SimpleNamespace(circuit=circuit))
    monkeypatch.setattr(recipe_circuits, "completeness", lambda *a, **k: None)
    found = {}
    monkeypatch.setattr(results, "write_discovery", lambda out, d, plan: found.__setitem__(out.name, d.found))

    def run(argv: list[str], model_dir) -> dict:
        found.clear()
        args = cli.build_parser().parse_args(["circuit", "--models", str(model_dir), *argv])
        circuit_stage.circuit_of(str(model_dir), args)
        return {where: ({g: r.scores for g, r in f.scores.items()}, set(f.reused)) for where, f in found.items()}

    return run


@pytest.fixture(scope="module")
def baseline() -> dict:
    return {}


def _fake_sweep(model, clean, corrupt, positions, **kwargs) -> str:
    """Stands for a sweep: a digest of everything the real one reads."""
    return digest({"model": model, "clean": clean, "corrupt": corrupt, "positions": positions, **kwargs})


def _fake_smallest(found: str, prompts) -> tuple[str, ...]:
    """Two earlier positions and the last token, chosen by the sweep's digest and the prompts."""
    h = int(digest({"sweep": found, "prompts": prompts})[:12], 16)
    earlier = [p for p in recipe_circuits.SWEEP_POSITIONS if p != "last"]
    first = earlier[h % len(earlier)]
    second = earlier[(h // len(earlier)) % len(earlier)]
    return tuple(dict.fromkeys([first, second, "last"]))


def _step_cases():
    cases = [(dest, a) for dest, a in stage_options.options("circuit").items() if dest not in STEP_OPTIONS_NOT_VARIED]
    return cases + [("weights", None)]


BASE_ARGS = ["--n", "6", "--minimality-n", "2", "--reference-n", "2", "--sweep-n", "4", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("dest, action", _step_cases(), ids=[c[0] for c in _step_cases()])
def test_a_step_is_reused_exactly_when_its_inputs_are_unchanged(
    circuit_run, checkpoints, baseline, tmp_path, tmp_path_factory, dest, action
):
    """Baseline run, then the run with one option changed, once afresh (its true scores) and
    once over the baseline's files: every step's scores are the true ones (no stale reuse), and
    a step is reused where its true scores are the baseline's (a key holds nothing else)."""
    model_dir = checkpoints[0]
    if dest == "weights":
        changed, changed_dir = BASE_ARGS, checkpoints[1]
    else:
        changed, changed_dir = stage_options.changed(BASE_ARGS, action), model_dir
    if not baseline:  # the baseline's files, made once for every case
        baseline["dir"] = tmp_path_factory.mktemp("baseline")
        baseline["found"] = circuit_run([*BASE_ARGS, "--results", str(baseline["dir"])], model_dir)
    base = baseline["found"]
    shutil.copytree(baseline["dir"], tmp_path / "b")
    truth = circuit_run([*changed, "--results", str(tmp_path / "fresh")], changed_dir)
    rerun = circuit_run([*changed, "--results", str(tmp_path / "b")], changed_dir)
    assert all(not reused for _, reused in truth.values())
    differs = 0
    for where, (scores, reused) in rerun.items():
        true_scores = truth[where][0]
        assert scores.keys() == true_scores.keys()
        for group, s in scores.items():
            assert torch.equal(s, true_scores[group]), f"{dest}: stale scores reused for {where}/{group}"
            same_as_base = group in base[where][0] and torch.equal(true_scores[group], base[where][0][group])
            assert (group in reused) == same_as_base, f"{dest}: {where}/{group} reused={group in reused}"
            differs += not same_as_base
    if dest in {"seed", "n", "boxes", "method", "dtype", "weights", "top_k", "top_k_cap", "sweep_n", "mark"}:
        assert differs, f"{dest} changed no step's scores: the check above proves nothing for it"
