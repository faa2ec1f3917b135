"""Reuse keys, property-tested, for DCM trainings (dcm_runs.json: the dcm stage over every
option and the weights, and dcm_run_key over every field of the plan, its config and the ask)
and for the ablation means (position_means' cache over every argument)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil

import pytest
import torch

from et_circuits import models
from et_circuits.core.circuit import Circuit
from et_circuits.core.settings import RunSettings
from et_circuits.methods import dcm as dcm_method
from et_circuits.methods import evaluation
from et_circuits.pipeline import cli, results, running
from et_circuits.pipeline.stages import dcm as dcm_stage
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from tests import stage_options
from tests.digest import digest

# run_dcm's arguments that cannot change one seed's training: the run settings (chunking,
# progress), the callbacks, and the ask list (each training is of one ask, digested alone).
RUN_DCM_IGNORES = {"settings", "finished", "on_seed", "asks"}
# DCMPlan / DCMConfig fields that cannot change one seed's training: the seed list (each
# training has its own seed), the summary's bootstrap, and the memory knobs.
PLAN_IGNORES = {"config", "seeds", "resamples", "resample_seed", "inference_batch_size", "max_stacked_rows"}
# dcm options not varied: another model, base or results folder holds no earlier training
# (another base: other asks, whose heads and positions are in the key, tested below); one CPU;
# the registry only names models; figures are drawn after.
DCM_OPTIONS_NOT_VARIED = {"models", "base", "results", "device", "n_devices", "registry", "figures"}


def _trainingdigest(model_digest: str, plan, ask, seed) -> str:
    """What one seed's training depends on: run_dcm's arguments but the ignored ones (the
    model and its tokenizer's vocabulary as `model_digest`), the plan's and config's fields but
    the ignored ones, the ask and the seed."""
    params = set(inspect.signature(recipe.run_dcm).parameters) - RUN_DCM_IGNORES
    assert params == {"model", "tokenizer", "plan"}, "run_dcm has a new parameter: digest it here"
    fields = {**dataclasses.asdict(plan), **dataclasses.asdict(plan.config)}
    fields = {k: v for k, v in fields.items() if k not in PLAN_IGNORES}
    return digest({"model": model_digest, "plan": fields, "ask": ask, "seed": seed})


@pytest.fixture
def dcm_run(checkpoints, monkeypatch):
    """Runs the dcm stage of one model on its own circuit with DCM faked: a training's mask
    is its digest's number; returns {(ask, seed): (mask number, true number, reused)}."""
    loaded, real_load = {}, models.load
    record, digests = {}, {}

    def load(name, device=None, dtype=None, n_devices=1):
        if (str(name), dtype) not in loaded:
            loaded[(str(name), dtype)] = real_load(name, device=device, dtype=dtype)
        return loaded[(str(name), dtype)]

    def fake_run_dcm(model, tokenizer, asks, plan, *, settings, finished, on_seed):
        if id(model) not in digests:  # each loaded model is digested once (none is changed)
            digests[id(model)] = digest({"model": model, "vocab": data.vocabulary(tokenizer)})
        answers = {}
        for ask in dict.fromkeys(asks):
            seeds = {}
            for seed in plan.seeds:
                truth = float(int(_trainingdigest(digests[id(model)], plan, ask, seed)[:6], 16))
                found = finished(ask, seed)
                computed = found is None
                if computed:
                    found = dcm_method.SeedResult(list(ask.heads), [truth], 1.0, 1.0, torch.ones(2), 0, 1)
                    on_seed(ask, seed, found)
                record[(ask, seed)] = (found.mask[0], truth, computed)
                seeds[seed] = found
            answers[ask] = dcm_method.summarize(ask.heads, ask.position, seeds, resamples=2, resample_seed=0)
        return answers

    monkeypatch.setattr(running.models, "load", load)
    monkeypatch.setattr(recipe, "run_dcm", fake_run_dcm)

    def run(argv: list[str], model_dir, results_dir) -> dict:
        record.clear()
        circuit = Circuit(
            {s.group: [(1, i % 4)] for i, s in enumerate(PAPER_STEPS)}, {s.group: s.position for s in PAPER_STEPS}
        )
        path = results.circuit_path(results_dir, models.result_name(model_dir), "paper")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            circuit.save(path)
        args = cli.build_parser().parse_args(
            ["dcm", "--models", str(model_dir), "--base", str(model_dir), "--results", str(results_dir), *argv]
        )
        dcm_stage.dcm_of(str(model_dir), args, *dcm_stage.inputs_of(str(model_dir), args))
        return dict(record)

    return run


BASE_ARGS = ["--n-train", "4", "--n-eval", "4", "--n-test", "4", "--seeds", "2", "--quiet", "--device", "cpu"]
CASES = [(d, a) for d, a in stage_options.options("dcm").items() if d not in DCM_OPTIONS_NOT_VARIED]
CASES += [("weights", None)]


@pytest.fixture(scope="module")
def baseline() -> dict:
    return {}


@pytest.mark.parametrize("dest, action", CASES, ids=[c[0] for c in CASES])
def test_a_training_is_reused_exactly_when_its_inputs_are_unchanged(
    dcm_run,
    checkpoints,
    baseline,
    tmp_path,
    tmp_path_factory,
    dest,
    action,
):
    """Baseline, then one option changed over the baseline's dcm_runs.json: every training
    holds the mask its own inputs give (none stale), and one is trained exactly when the
    baseline did not train the same inputs."""
    model_dir = checkpoints[0]
    if not baseline:  # the baseline's files, made once for every case
        baseline["dir"] = tmp_path_factory.mktemp("dcm-baseline")
        baseline["runs"] = dcm_run(BASE_ARGS, model_dir, baseline["dir"])
    shutil.copytree(baseline["dir"], tmp_path / "b")
    if dest == "weights":
        changed, changed_dir = BASE_ARGS, checkpoints[1]
    else:
        changed, changed_dir = stage_options.changed(BASE_ARGS, action), model_dir
    rerun = dcm_run(changed, changed_dir, tmp_path / "b")
    trained_before = {truth for _, truth, _ in baseline["runs"].values()}
    for key, (mask, truth, computed) in rerun.items():
        assert mask == truth, f"{dest}: a stale training was reused for {key}"
        assert computed == (truth not in trained_before), f"{dest}: {key} computed={computed}"
    if dest in {"seeds", "n_train", "n_eval", "n_test", "epochs", "lr", "lam", "boxes", "dtype", "seed", "weights"}:
        assert {truth for _, truth, _ in rerun.values()} - trained_before, f"{dest} changed no training"


def _other(value):
    """Another valid value of a plan, config or ask field."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return "query_label" if value != "query_label" else "last"
    if isinstance(value, tuple):
        return (*value[:-1], _other(value[-1])) if value else ((0, 0),)
    raise TypeError(f"no other value for {value!r}")


def test_dcm_run_key_names_every_field_that_changes_a_training():
    plan = recipe.DCMPlan(dcm_method.DCMConfig(), (8, 4, 4), 5, data_seed=3, seeds=(0, 1))
    ask = recipe.Ask(((1, 0), (1, 2)), "last", "positional")
    key = results.dcm_run_key(plan, ask, 0, "w")
    for f in dataclasses.fields(plan.config):
        other = dataclasses.replace(
            plan, config=dataclasses.replace(plan.config, **{f.name: _other(getattr(plan.config, f.name))})
        )
        assert (results.dcm_run_key(other, ask, 0, "w") != key) == (f.name not in PLAN_IGNORES), f.name
    for f in dataclasses.fields(plan):
        if f.name != "config":
            other = dataclasses.replace(plan, **{f.name: _other(getattr(plan, f.name))})
            assert (results.dcm_run_key(other, ask, 0, "w") != key) == (f.name not in PLAN_IGNORES), f.name
    for f in dataclasses.fields(ask):
        other = dataclasses.replace(ask, **{f.name: _other(getattr(ask, f.name))})
        assert results.dcm_run_key(plan, other, 0, "w") != key, f.name
    assert results.dcm_run_key(plan, ask, 1, "w") != key and results.dcm_run_key(plan, ask, 0, "v") != key


# position_means' arguments that do not change the means: where they are kept.
MEANS_IGNORES = {"cache_dir"}


def test_ablation_means_are_reused_exactly_when_their_inputs_are_unchanged(tiny_dir, vocab, tmp_path, monkeypatch):
    """Each argument of position_means changed alone (weights beyond the first entries of a
    tensor, dtype, one prompt token, the batch size) computes the means anew; the same
    arguments read them back; progress and max rows do not count."""
    model, tok, _ = models.load(tiny_dir, device="cpu")
    reference = data.make_prompts(tok, data.sample_prompts(vocab, 6, 3, 1))
    settings = RunSettings(batch_size=4, progress=False)
    computed = []
    real = evaluation.mean_activations
    monkeypatch.setattr(evaluation, "mean_activations", lambda *a, **k: computed.append(1) or real(*a, **k))
    first = evaluation.position_means(model, reference, settings=settings, cache_dir=tmp_path)
    assert len(computed) == 1
    other_weights, _, _ = models.load(tiny_dir, device="cpu")
    with torch.no_grad():
        other_weights.blocks[1].attn.W_O.mul_(1.5)  # every entry, not only the first ones
    ids = reference.input_ids.clone()
    ids[0, 1] = ids[1, 1] if ids[1, 1] != ids[0, 1] else ids[0, 2]
    variants = {
        "model": dict(model=other_weights),
        "model (dtype)": dict(model=models.load(tiny_dir, device="cpu", dtype="bfloat16")[0]),
        "reference": dict(reference=dataclasses.replace(reference, input_ids=ids)),
        "settings": dict(settings=RunSettings(batch_size=3, progress=False)),
    }
    varied = {name.split(" ")[0] for name in variants}
    assert varied == set(inspect.signature(evaluation.position_means).parameters) - MEANS_IGNORES
    base = dict(model=model, reference=reference, settings=settings, cache_dir=tmp_path)
    for name, change in variants.items():
        computed.clear()
        evaluation.position_means(**{**base, **change})
        assert computed == [1], f"{name}: the means were not computed anew"
    computed.clear()
    again = evaluation.position_means(**{**base, "settings": RunSettings(batch_size=4, max_rows=7, progress=True)})
    assert computed == [] and torch.equal(again, first)


def test_dcm_json_records_the_settings_it_ran_with(dcm_run, checkpoints, tmp_path):
    """dcm.json's settings are the command line's: every one named like an option has its
    value (non-default values, so that a default cannot pass for it), the seeds are --seeds
    consecutive ones from --seed."""
    argv = ["--lr", "0.3", "--lam", "0.02", "--epochs", "3", "--batch-size", "5", "--resamples", "7", "--seed", "4"]
    dcm_run([*BASE_ARGS, *argv], checkpoints[0], tmp_path)
    args = cli.build_parser().parse_args(["dcm", "--models", "m", "--base", "m", *BASE_ARGS, *argv])
    settings = json.loads((tmp_path / models.result_name(checkpoints[0]) / results.DCM).read_text())["settings"]
    named = {k: v for k, v in settings.items() if k in vars(args) and k != "seeds"}
    assert named == {k: getattr(args, k) for k in named} and len(named) >= 8
    assert settings["seeds"] == [4, 5]
