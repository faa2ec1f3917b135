"""Which models exist and where their weights are: the built-in registry and its environment
variables, registry files (names relative to the file, malformed entries refused in one line),
directories given directly, and safe result names."""

from __future__ import annotations

import pytest

from et_circuits import models
from tests import checkpoints
from tests.conftest import make_checkpoint
from tests.unit.models.support import one_line_error, write

# ---------------------------------------------------------------------------------------------
# built-in registry


def test_registry_env_var_points_at_weights(tmp_path, monkeypatch):
    make_checkpoint(tmp_path)
    monkeypatch.setenv("ET_CIRCUITS_VICUNA_7B", str(tmp_path))
    model, _, spec = models.load("vicuna-7b", device="cpu")
    assert spec.name == "vicuna-7b" and model.cfg.n_layers == 2 and model.cfg.model_name == "vicuna-7b"


def test_models_dir_var(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "float-7b")
    monkeypatch.setenv("ET_CIRCUITS_MODELS", str(tmp_path))
    assert models.resolve_dir(models.get_spec("float-7b")) == tmp_path / "float-7b"


def test_missing_weights_message_names_every_place(monkeypatch, tmp_path):
    monkeypatch.delenv("ET_CIRCUITS_LLAMA_7B", raising=False)
    monkeypatch.setenv("ET_CIRCUITS_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(
        lambda: models.load("llama-7b", device="cpu"),
        "ET_CIRCUITS_LLAMA_7B",
        str(tmp_path / "llama-7b"),
        "huggyllama/llama-7b",
    )


# ---------------------------------------------------------------------------------------------
# registry files, directories, result names


def test_registry_maps_names_to_directories_relative_to_the_file(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "weights" / "base")
    registry = write(tmp_path / "conf" / "models.toml", '[models.my-base]\npath = "../weights/base"\n')
    monkeypatch.chdir(tmp_path / "weights")  # relative to the file, not to the working directory
    assert set(models.use_registry(registry)) == {"my-base"}
    model, _, spec = models.load("my-base", device="cpu")
    assert model.cfg.n_layers == 2 and spec.local_dir.resolve() == (tmp_path / "weights" / "base").resolve()
    assert models.result_name("my-base") == "my-base" and "models.toml [models.my-base]" in spec.origin


def test_registry_from_the_environment(tmp_path, monkeypatch):
    first = write(tmp_path / "a.toml", f'[models.mine]\npath = "{tmp_path / "a"}"\n')
    second = write(
        tmp_path / "b.toml", f'[models.mine]\npath = "{tmp_path / "b"}"\n[models.llama-7b]\npath = "{tmp_path / "c"}"\n'
    )
    monkeypatch.setenv(models.REGISTRY_VAR, str(first))
    assert models.get_spec("mine").local_dir == tmp_path / "a"
    models.use_registry(second)  # --registry wins over the variable, and over built-in names
    assert models.get_spec("mine").local_dir == tmp_path / "b"
    assert models.get_spec("llama-7b").local_dir == tmp_path / "c"
    models.use_registry(None)
    assert models.get_spec("mine").local_dir == tmp_path / "a"
    assert models.get_spec("llama-7b").hf_repo == "huggyllama/llama-7b"


GOOD = '[models.good]\npath = "g"\n'


@pytest.mark.parametrize(
    "entry, message",
    [
        ("[models.bad]\n", "missing path"),
        ('[models.bad]\nbase = "nope"\nadapter = "a"\n', "unknown base 'nope'; known models: llama-7b"),
        ('[models.bad]\nadapter = "a"\n', "an adapter needs a base"),
        ('[models.bad]\nbase = "good"\n', "a base needs an adapter"),
        ('[models.bad]\npath = "p"\nbase = "good"\nadapter = "a"\n', "not both"),
        ('[models.bad]\npaht = "p"\n', "unknown key 'paht'"),
        ("[models.bad]\npath = 3\n", "path must be a non-empty string"),
        ('[models.bad]\nbase = "goat-7b"\nadapter = "a"\n', "base 'goat-7b' is itself an adapter"),
        ('[models."bad/x"]\npath = "p"\n', "a model name is letters"),
        ('[models]\nbad = "p"\n', "expected a table"),
    ],
    ids=[
        "missing-path",
        "unknown-base",
        "adapter-without-base",
        "base-without-adapter",
        "path-and-adapter",
        "unknown-key",
        "not-a-string",
        "base-is-adapter",
        "unsafe-name",
        "not-a-table",
    ],
)
def test_malformed_registry_entry_is_one_line_naming_it(tmp_path, entry, message):
    registry = write(tmp_path / "models.toml", GOOD + entry)
    one_line_error(lambda: models.use_registry(registry), f"{registry} [models.bad", message)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[models.x\n", "is not valid TOML"),
        ('name = "x"\n', "expected only [models.<name>] tables"),
        (None, "cannot be read"),
    ],
    ids=["toml", "layout", "missing"],
)
def test_malformed_registry_file_is_one_line(tmp_path, text, message):
    registry = tmp_path / "models.toml"
    if text is not None:
        registry.write_text(text)
    one_line_error(lambda: models.use_registry(registry), str(registry), message)


def test_registry_entry_without_weights_names_it(tmp_path):
    registry = write(tmp_path / "models.toml", GOOD + '[models.ft]\nbase = "good"\nadapter = "lora"\n')
    models.use_registry(registry)
    one_line_error(
        lambda: models.load("good", device="cpu"), "good", str(tmp_path / "g"), "[models.good]", "config.json"
    )
    make_checkpoint(tmp_path / "g")
    one_line_error(lambda: models.load("ft", device="cpu"), str(tmp_path / "lora"), "adapter_config.json")


def test_unknown_model_lists_the_registry_files_names(tmp_path):
    models.use_registry(write(tmp_path / "models.toml", GOOD))
    one_line_error(lambda: models.get_spec("nope"), "unknown model 'nope'", "llama-7b", "good")


def test_directory_given_directly(tmp_path):
    path = tmp_path / "my model (v2)"
    make_checkpoint(path)
    model, _, spec = models.load(str(path) + "/", device="cpu")
    assert spec.name == model.cfg.model_name == "my_model__v2_" and spec.local_dir == path


def test_adapter_directory_alone_is_refused(tmp_path):
    hf = checkpoints.make(tmp_path / "base")
    checkpoints.make_adapter(hf, tmp_path / "lora")
    one_line_error(lambda: models.load(tmp_path / "lora", device="cpu"), "is a PEFT adapter", "base =")


def test_result_names_are_safe(tmp_path, monkeypatch):
    assert models.result_name("organism-goat") == "organism-goat"
    assert models.result_name("/data/runs/ckpt 1:final/") == "ckpt_1_final"
    assert models.result_name("/data/.hidden") == "hidden"
    assert models.result_name("/") == "model"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert models.result_name(".") == "here"
