"""Every flag reaches its method: for every option of every model-running stage (read off the
parser, so that a new flag is covered), a run with another value must change what the stage
hands its method or the model loader. The loader and the methods are spies that record their
arguments; the stage stops at its first method call. Plus --dtype and --device down to the
loaded model."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.prompts import PromptSet
from et_circuits.pipeline import cli, running
from et_circuits.pipeline.args import DTYPE_NAMES
from et_circuits.pipeline.stages import accuracy, cmap, knockout
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS, letter
from tests import stage_options


class Reached(Exception):
    """Raised by a method spy once it has recorded its arguments."""


# The method each stage hands its work to: (module, attribute) spied on.
METHODS = {
    "accuracy": [(accuracy, "measure")],
    "circuit": [(recipe, "discover")],
    "table1": [(recipe, "table1_row")],
    "dcm": [(recipe, "run_dcm")],
    "cmap": [(cmap, "cmap")],
    "knockout": [(recipe, "with_random_context"), (knockout, "knockout")],
}
# Spied functions that go on to run (the stage has more to hand its method).
PASSED_THROUGH = {("et_circuits.tasks.entity_tracking.recipe.knockout", "with_random_context")}

# The smallest run of each stage (tiny prompt counts keep it cheap); m1 is the base, m2 fine-tuned.
BASELINE = {
    "accuracy": ["--models", "m1", "--n", "4"],
    "circuit": ["--models", "m1", "--n", "4", "--minimality-n", "4", "--reference-n", "4", "--sweep-n", "4"],
    "table1": ["--base", "m1", "--models", "m1", "--n", "4", "--reference-n", "4", "--random", "2"],
    "dcm": ["--models", "m2", "--base", "m1", "--n-train", "4", "--n-eval", "4", "--n-test", "4"],
    "cmap": ["--base", "m1", "--models", "m2", "--n", "4"],
    "knockout": ["--models", "m1", "--n", "4"],
}

# Options whose other value is not a plain variation; each is named with what it becomes.
OTHER = {
    "models": lambda command: ["m3"],
    "base": lambda command: ["m3"],
    "results": lambda command: [str(ALT_RESULTS)],
    "device": lambda command: ["cuda:7"],  # resolve_device is a pass-through spy below
    "source_device": lambda command: ["cuda:7"],
}

# Options no method receives, on purpose (each with the reason):
NOT_A_METHOD_INPUT = {
    "registry",  # cli.main installs the registry before any stage (tests/unit/models/test_registry.py)
    "figures",  # where figures go, written after the methods (tests/integration/test_report.py)
}

RESULTS = Path("results-flags")  # made under tmp_path by the fixture below
ALT_RESULTS = Path("results-flags-alt")


def _circuit(shift: int, binder: str | None = None) -> Circuit:
    """The paper's groups, one head each (which one: `shift`), and a "binder" group at `binder`."""
    heads = {s.group: [(1, (i + shift) % 4)] for i, s in enumerate(PAPER_STEPS)}
    positions = {s.group: s.position for s in PAPER_STEPS}
    if binder is not None:
        heads["binder"], positions["binder"] = [(0, shift % 4)], binder
    return Circuit(heads, positions)


def _section(name: str, circuit: Circuit, selected: Circuit) -> dict:
    """A dcm.json section on `circuit` whose DCM selections are `selected`'s groups."""
    return {
        "circuit": name,
        "positions": circuit.to_dict()["positions"],
        "group_heads": {g: [list(h) for h in hs] for g, hs in circuit.groups.items()},
        "groups": {
            g: {d: {"heads": [list(h) for h in selected.groups[g]]}} for g, d in recipe.SET_DESIDERATA.items() if d
        },
    }


def _write_results(root: Path, shift: int, binder: str) -> None:
    """circuit.json of m1, m2, m3 in both readings (the discovered one with a binder group at
    `binder`), and their dcm.json (what cmap reads), whose selections on the model's own
    circuit are that circuit's heads and on the base circuit others."""
    for name, k in (("m1", shift), ("m2", shift + 1), ("m3", shift + 2)):
        circuit = _circuit(k)
        for sub, c in (("", circuit), ("discovered", _circuit(k, binder))):
            (root / name / sub).mkdir(parents=True, exist_ok=True)
            c.save(root / name / sub / "circuit.json")
        own, base = (_section(name, circuit, c) for c in (circuit, _circuit(k + 1)))
        dcm = {"model": name, "base": "m1", "base_circuit": base, "own_circuit": own}
        (root / name / "dcm.json").write_text(json.dumps(dcm))


def _plain(value):
    """A comparable rendering of what a spy received."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, HookedTransformer):
        return "model"  # which model: the loader's record
    if isinstance(value, PromptSet):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, torch.Tensor):
        return hashlib.sha256(value.cpu().numpy().tobytes()).hexdigest()[:12] + str(tuple(value.shape))
    if isinstance(value, Circuit):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value) and not dataclasses.is_dataclass(value):
        return getattr(getattr(value, "__self__", None), "path", "callable")
    if dataclasses.is_dataclass(value):
        return {
            "type": type(value).__name__,
            **{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    return repr(value) if not hasattr(value, "vocab_size") else "tokenizer"


@pytest.fixture
def spied(tiny, tmp_path, monkeypatch):
    """Runs `python -m et_circuits <argv>` in this process with spies; returns its records."""
    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    _write_results(RESULTS, 0, "prev_query_label")
    _write_results(ALT_RESULTS, 2, "query_label+1")
    records: list = []

    def load(name, device=None, dtype=None, n_devices=1):
        records.append(("load", {"name": str(name), "device": device, "dtype": dtype, "n_devices": n_devices}))
        return model, tok, type("Spec", (), {"name": str(name)})()

    monkeypatch.setattr(running.models, "load", load)
    monkeypatch.setattr(running, "resolve_device", lambda device, n_devices=1: device or "cpu")
    for command, spies in METHODS.items():
        for module, attribute in spies:
            real = getattr(module, attribute)

            def spy(*args, _name=f"{command}:{attribute}", _real=real, **kwargs):
                records.append((_name, _plain(inspect.signature(_real).bind(*args, **kwargs).arguments)))
                if (_real.__module__, _real.__name__) in PASSED_THROUGH:
                    return _real(*args, **kwargs)
                raise Reached

            monkeypatch.setattr(module, attribute, spy)

    def run(argv: list[str]) -> list:
        records.clear()
        with pytest.raises(Reached):
            cli.main(
                [*argv, "--results", str(RESULTS)] if "--results" not in argv and _has(argv[0], "results") else argv
            )
        return json.loads(json.dumps(records, default=str))

    return run


def _has(command: str, dest: str) -> bool:
    return dest in stage_options.options(command)


CASES = [
    (command, dest) for command in BASELINE for dest in stage_options.options(command) if dest not in NOT_A_METHOD_INPUT
]


def test_every_model_running_command_is_covered():
    """A new model-running command gets a baseline here (commands without a model are not)."""
    runs_models = {c for c in stage_options.subparsers() if _has(c, "dtype")}
    assert runs_models == set(BASELINE) == set(METHODS)


@pytest.mark.parametrize("command, dest", CASES, ids=[f"{c}--{d}" for c, d in CASES])
def test_each_option_reaches_the_method(spied, command, dest):
    baseline = [command, *BASELINE[command]]
    action = stage_options.options(command)[dest]
    changed = (
        [*stage_options.without(baseline, action), stage_options.flag(action), *OTHER[dest](command)]
        if dest in OTHER
        else stage_options.changed(baseline, action)
    )
    before, after = spied(baseline), spied(changed)
    assert before != after, f"{' '.join(changed)}: --{dest} changed nothing a method receives"
    if dest in EVERY_USE:
        old, new = dict(_leaves(before)), dict(_leaves(after))
        named = [path for path in old if any(_named(dest, part) for part in path)]
        assert all(old[path] != new.get(path) for path in named), (
            f"--{dest} did not reach: {[path for path in named if old[path] == new.get(path)]}"
        )


# Options that must reach every argument named after them (the seed every seeded thing, the
# batch size every batch, ...): e.g. --seed the plan's data_seed, its training seeds and its
# resampling seed, and the knockout's random context.
EVERY_USE = ("seed", "boxes", "batch_size", "device", "dtype")
# Names that match but are not such uses: a count of devices, a callback, and DCM's chunks of
# gradient-free passes (its memory knob, which results do not depend on).
NOT_A_USE = {"n_devices", "on_seed", "inference_batch_size"}


def _named(dest: str, name: str) -> bool:
    """Whether an argument or field `name` is named after option `dest` (word by word, plural
    or not): seed -> data_seed, seeds, resample_seed; boxes -> n_boxes."""
    if name in NOT_A_USE:
        return False
    words = {w.rstrip("s") for w in name.split("_")}
    return {w.rstrip("s") for w in dest.split("_")} <= words


def _leaves(value, path=()):
    """(path of names, value) of every leaf of a record."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, f"#{i}"))
    else:
        yield path, value


def test_cmap_patches_the_heads_dcm_selected_on_the_models_own_circuit(spied):
    """Each paper set (A-C) is the own-circuit section's DCM selection of its group, D and the
    full set the model's own circuit.json."""
    (record,) = [r for r in spied(["cmap", *BASELINE["cmap"]]) if r[0] == "cmap:cmap"]
    own = Circuit.load(RESULTS / "m2" / "circuit.json")
    sets = {v["name"]: v["heads"]["groups"] for v in record[1]["variants"] if v["patch"] == "z"}
    for group in recipe.SET_DESIDERATA:
        assert sets[letter(group)] == {group: [list(h) for h in own.groups[group]]}, group
    assert sets[recipe.FULL] == {g: [list(h) for h in hs] for g, hs in own.groups.items()}


@pytest.mark.parametrize("command, method", [("cmap", "cmap:cmap"), ("knockout", "knockout:knockout")])
def test_a_stage_draws_its_own_prompts(spied, tiny, command, method):
    """CMAP and knockout run on the prompts of their own purpose (seed + its offset), not on
    those of another stage."""
    (record,) = [r for r in spied([command, *BASELINE[command], "--seed", "3"]) if r[0] == method]
    vocab = data.vocabulary(tiny[1], min_objects=7, min_labels=7)
    drawn = {p: _plain(recipe.prompts(tiny[1], vocab, 4, 7, 3 + k).input_ids) for p, k in recipe.SEED_OFFSETS.items()}
    received = record[1]["prompts"]["input_ids"]
    assert [p for p, ids in drawn.items() if ids == received] == [command]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_dtype_and_device_reach_the_loaded_model(tiny_dir, dtype):
    """`--dtype` and `--device` as parsed are the loaded model's: its config and its weights."""
    args = cli.build_parser().parse_args(["accuracy", "--models", str(tiny_dir), "--dtype", dtype, "--device", "cpu"])
    model, _, _ = running.load_model(str(tiny_dir), args)
    expected = getattr(torch, dtype)
    assert model.cfg.dtype == expected and model.cfg.device == "cpu"
    assert {p.dtype for p in model.parameters()} == {expected}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
