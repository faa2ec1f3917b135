"""Command-line errors that end before any model runs: unknown or unsupported models, missing
weights, devices that are not there, impossible parameters, missing or malformed result files
and running out of memory all end in one line on stderr and exit 2, through `cli.main`."""

import pytest
import torch

from et_circuits.core.circuit import Circuit
from et_circuits.models import result_name
from et_circuits.pipeline import cli
from et_circuits.pipeline.stages import accuracy as accuracy_stage
from et_circuits.pipeline.stages import circuit as circuit_stage
from tests import checkpoints


def run(capsys, *args):
    """(exit status, stdout, stderr) of `python -m et_circuits *args`, in-process."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, *parts):
    code, _, err = result
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0]


def test_missing_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ET_CIRCUITS_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ET_CIRCUITS_GOAT_7B", raising=False)
    result = run(capsys, "accuracy", "--model", "goat-7b")
    assert_one_line_error(result, "goat-7b", "ET_CIRCUITS_GOAT_7B", str(tmp_path / "goat-7b"), "tiedong/goat-lora-7b")


def test_unknown_model_lists_known_ones(capsys):
    assert_one_line_error(run(capsys, "accuracy", "--model", "gpt-5"), "gpt-5", "llama-7b", "organism-goat")


def test_unsupported_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert_one_line_error(run(capsys, "accuracy", "--model", str(tmp_path)), "bert")


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "tpu", "warp-drive"])
def test_unavailable_device_is_one_line_naming_the_available_ones(tiny_dir, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    result = run(capsys, "accuracy", "--model", str(tiny_dir), "--device", device)
    assert_one_line_error(result, repr(device), "available: cpu")


def test_split_without_gpus_is_one_line(tiny_dir, capsys):
    result = run(capsys, "accuracy", "--model", str(tiny_dir), "--device", "cpu", "--n-devices", "2")
    assert_one_line_error(result, "--n-devices 2 needs CUDA GPUs")


def test_impossible_parameters_are_usage_errors(tiny_dir, capsys):
    code, _, err = run(capsys, "accuracy", "--model", str(tiny_dir), "--boxes", "40")
    assert code == 2 and "between 2 and 26" in err
    code, _, err = run(capsys, "accuracy", "--model", str(tiny_dir), "--batch-size", "0")
    assert code == 2 and "must be positive" in err


def test_commands_fail_with_one_line(tmp_path, capsys, tiny_dir):
    """Missing or malformed result files and unknown models end in one line; impossible
    arguments are usage errors (no model runs)."""
    base, name = str(tiny_dir), result_name(str(tiny_dir))
    assert cli.main(["table1", "--base", base, "--models", base, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no circuit at") and "\n" not in err
    (tmp_path / name).mkdir()
    (tmp_path / name / "circuit.json").write_text("{not json")
    assert cli.main(["figures", "--base", base, "--models", base, "--results", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert cli.main(["circuit", "--model", "no-such-model", "--results", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["circuit", "--model", base, "--top-k", "1", "2", "3"])
    with pytest.raises(SystemExit):
        cli.main(["circuit", "--model", base, "--top-k-cap", "2"])


def _out_of_memory(args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize(
    "command, knobs",
    [
        (["accuracy", "--model", "m", "--device", "cuda:1"], ["cuda:1", "lower --batch-size"]),
        (["circuit", "--model", "m"], ["lower --batch-size or --max-rows"]),
    ],
)
def test_out_of_memory_is_one_line_naming_the_knobs(monkeypatch, capsys, command, knobs):
    monkeypatch.setattr(accuracy_stage, "cmd_accuracy", _out_of_memory)
    monkeypatch.setattr(circuit_stage, "cmd_circuit", _out_of_memory)
    assert cli.main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: out of memory on ")
    for part in knobs:
        assert part in err
    if command[0] == "accuracy":
        assert "--max-rows" not in err


def test_a_truncated_checkpoint_is_named_in_one_line(tmp_path, capsys):
    checkpoints.make(tmp_path / "m")
    capsys.readouterr()  # the factory's own progress bar
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run(capsys, "accuracy", "--model", str(tmp_path / "m"), "--device", "cpu", "--quiet")
    assert_one_line_error(result, str(tmp_path / "m"), "corrupt or truncated")


def test_report_on_a_missing_results_folder_writes_no_page(tmp_path, capsys):
    page = tmp_path / "figures" / "report.html"
    result = run(capsys, "report", "--results", str(tmp_path / "resluts"), "--figures", str(tmp_path / "figures"))
    assert_one_line_error(result, str(tmp_path / "resluts"), "make all")
    assert not page.exists()


def test_dcm_before_the_circuit_stage_says_to_run_it(tmp_path, capsys, tiny_dir):
    (tmp_path / "results").mkdir()
    result = run(
        capsys, "dcm", "--models", str(tiny_dir), "--base", str(tiny_dir), "--results", str(tmp_path / "results")
    )
    assert_one_line_error(result, "no circuit at", "run `make circuit`")


def test_knockout_refuses_a_circuit_with_heads_outside_the_model(tmp_path, capsys, tiny_dir):
    name = result_name(str(tiny_dir))
    out = tmp_path / "results" / name / "discovered"
    Circuit({"a": [(7, 0)]}, {"a": "query_label"}).save(out / "circuit.json")  # the tiny model has 2 layers
    result = run(capsys, "knockout", "--models", str(tiny_dir), "--results", str(tmp_path / "results"), "--quiet")
    assert_one_line_error(result, "L7H0", "outside the model")
    assert not (tmp_path / "results" / "knockout.csv").exists()
