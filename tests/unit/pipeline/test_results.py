"""The results layout and its reuse keys: where readings live, dcm_runs.json (every DCM training
saved under a key naming everything it depends on, reused only when the key matches), and the
path-patching step files."""

from __future__ import annotations

import json

import pytest
import torch

from et_circuits.core.errors import CircuitError
from et_circuits.core.types import Receiver
from et_circuits.methods import dcm
from et_circuits.methods.path_patching import PathPatching
from et_circuits.pipeline import results
from et_circuits.tasks.entity_tracking import recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS

ASKS = [
    recipe.Ask(((1, 0), (1, 3)), "last", "object_value"),
    recipe.Ask(((0, 3),), "prev_query_label", "positional"),
    recipe.Ask((), "query_label", "positional"),  # an empty group
]


def test_reading_dirs_and_figure_stems(tmp_path):
    assert results.reading_dir(tmp_path, "m", "paper") == tmp_path / "m"
    assert results.circuit_path(tmp_path, "m", "discovered") == tmp_path / "m" / "discovered" / "circuit.json"
    with pytest.raises(CircuitError, match="unknown reading"):
        results.reading_dir(tmp_path, "m", "other")
    assert results.figure_stem("m", "paper", "sweep") == "m_sweep"
    assert results.figure_stem("m", "discovered", "circuit") == "m_discovered_circuit"
    assert (results.stage_stem("cmap"), results.stage_stem("dcm", "discovered")) == ("cmap", "dcm_discovered")


def test_runs_file_saves_every_training_and_reuses_only_matching_keys(tiny, tmp_path, monkeypatch):
    """Every training is written to dcm_runs.json under its key; a rerun reading the file trains
    nothing and gives the same dcm.json entries; any setting in the key changed trains again."""
    model, tok = tiny
    plan = recipe.DCMPlan(dcm.DCMConfig(batch_size=16), (32, 16, 16), 7, data_seed=5, seeds=(0, 1), resamples=4)
    path = tmp_path / "dcm_runs.json"
    runs = results.RunsFile(path, plan)
    first = recipe.run_dcm(model, tok, ASKS, plan, finished=runs.finished, on_seed=runs.on_seed)
    saved = json.loads(path.read_text())
    assert set(saved) == {results.dcm_run_key(plan, a, s) for a in ASKS for s in plan.seeds}
    for a in ASKS:
        for s in plan.seeds:
            entry = saved[results.dcm_run_key(plan, a, s)]
            assert entry["test_correct"] == "".join("1" if v else "0" for v in first[a].seeds[s].test_values.tolist())
            assert len(entry["test_correct"]) == 16 and entry["test_accuracy"] == first[a].seeds[s].test_score

    def no_training(*args, **kwargs):
        raise AssertionError("a finished training was run again")

    monkeypatch.setattr(dcm.protocol, "train_masks", no_training)
    reread = results.RunsFile(path, plan)
    again = recipe.run_dcm(model, tok, ASKS, plan, finished=reread.finished, on_seed=reread.on_seed)
    assert {a: results.dcm_entry(r) for a, r in again.items()} == {a: results.dcm_entry(r) for a, r in first.items()}
    other = recipe.DCMPlan(dcm.DCMConfig(batch_size=16, lam=0.1), (32, 16, 16), 7, data_seed=5, seeds=(0, 1))
    assert results.dcm_run_key(other, ASKS[0], 0) != results.dcm_run_key(plan, ASKS[0], 0)
    stale = results.RunsFile(path, other)
    with pytest.raises(AssertionError, match="run again"):  # other settings: not reused
        recipe.run_dcm(model, tok, ASKS[:1], other, finished=stale.finished, on_seed=stale.on_seed)
    reread.keep_only(ASKS[:1])  # stale trainings dropped
    assert set(json.loads(path.read_text())) == {results.dcm_run_key(plan, ASKS[0], s) for s in plan.seeds}


def test_seed_json_round_trip_keeps_the_scores():
    seed = dcm.SeedResult([(1, 0)], [0.25, 1.0], 0.75, 0.5, torch.tensor([1.0, 0.0, 1.0, 0.0]), 3, 8, 0.5)
    back = results.seed_from_json(json.loads(json.dumps(results.seed_to_json(seed))))
    assert (back.heads, back.mask, back.eval_score, back.test_score, back.best_step, back.steps, back.seconds) == (
        [(1, 0)],
        [0.25, 1.0],
        0.75,
        0.5,
        3,
        8,
        0.5,
    )
    assert torch.equal(back.test_values, seed.test_values)


def test_step_files_reuse_a_step_only_with_its_key(tmp_path, capsys):
    """A step's scores are written with their key as metadata and read back only for the same
    key (other receivers, another method or another model: recomputed)."""
    base = {"model": "m", "seed": "0", "n": "12", "boxes": "7", "dtype": "float32"}
    step = PAPER_STEPS[1]
    receivers = [Receiver(1, 0, "q", "last"), Receiver(1, 2, "q", "last")]
    scores = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    finished, on_step = results.step_files(tmp_path, base, "fast")
    assert finished(step, receivers) is None
    on_step(step, receivers, PathPatching(scores, step.position, tuple(receivers), n=12), False, 0.5)
    assert "m step B (pos_transmitter): 0.5s" in capsys.readouterr().out
    back = finished(step, receivers)
    assert torch.equal(back.scores, scores) and back.n == 12 and back.receivers == tuple(receivers)
    assert finished(step, receivers[:1]) is None
    assert results.step_files(tmp_path, base, "reference")[0](step, receivers) is None
    assert results.step_files(tmp_path, {**base, "model": "other"}, "fast")[0](step, receivers) is None
    assert torch.equal(results.load_scores(tmp_path / "pos_transmitter.safetensors")[0], scores)
    with pytest.raises(CircuitError, match="no path-patching scores"):
        results.load_scores(tmp_path / "missing.safetensors")


def test_dcm_entry_on_a_hand_written_result():
    """dcm.json's entry: the selected seed's heads, the resampled accuracies with their mean and
    sample std, and the mean and sample std of the seeds' test accuracies (not the same)."""
    seeds = {
        0: dcm.SeedResult([(1, 0)], [1.0, 0.0], 0.5, 0.25, torch.tensor([1.0, 0.0, 0.0, 0.0]), 3, 8),
        1: dcm.SeedResult([(1, 2)], [0.0, 1.0], 0.75, 0.5, torch.tensor([1.0, 1.0, 0.0, 0.0]), 5, 8),
    }
    result = dcm.DCMResult(((1, 0), (1, 2)), "last", 1, seeds, [0.25, 0.75])
    entry = results.dcm_entry(result)
    assert entry["heads"] == [[1, 2]] and entry["selected_seed"] == 1
    assert entry["accuracy"] == [0.25, 0.75]
    assert entry["accuracy_mean"] == pytest.approx(0.5)
    assert entry["accuracy_std"] == pytest.approx(0.5**0.5 / 2)  # sample std of 0.25, 0.75
    assert entry["test_accuracy_mean"] == pytest.approx(0.375)
    assert entry["test_accuracy_std"] == pytest.approx(0.125 * 2**0.5)  # sample std of 0.25, 0.5
    assert set(entry["seeds"]) == {"0", "1"} and entry["seeds"]["0"]["eval_accuracy"] == 0.5
    assert "test_correct" not in entry["seeds"]["1"] and entry["seeds"]["1"]["heads"] == [[1, 2]]
