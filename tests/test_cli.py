import os
import re
import subprocess
import sys

import pytest
import torch

from et_circuits import cli
from et_circuits.stages import circuit as circuit_stage


def run_cli(*args, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "et_circuits", *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def assert_one_line_error(proc, *parts):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for part in parts:
        assert part in lines[0]


def test_missing_weights(tmp_path):
    proc = run_cli("accuracy", "--model", "goat-7b", env={"ET_CIRCUITS_MODELS": str(tmp_path)})
    assert_one_line_error(proc, "goat-7b", "ET_CIRCUITS_GOAT_7B", str(tmp_path / "goat-7b"), "tiedong/goat-lora-7b")


def test_unknown_model_lists_known_ones():
    proc = run_cli("accuracy", "--model", "gpt-5")
    assert_one_line_error(proc, "gpt-5", "llama-7b", "organism-goat")


def test_not_a_llama_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert_one_line_error(run_cli("accuracy", "--model", str(tmp_path)), "not a LLaMA")


def test_impossible_parameters_are_usage_errors(tiny_dir):
    proc = run_cli("accuracy", "--model", str(tiny_dir), "--boxes", "40")
    assert proc.returncode == 2 and "between 2 and 26" in proc.stderr


def test_accuracy_line(tiny_dir):
    proc = run_cli("accuracy", "--model", str(tiny_dir), "--n", "16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{tiny_dir.name} accuracy=\d\.\d{{3}} n=16", last)


def test_batch_size_must_be_positive(tiny_dir):
    proc = run_cli("accuracy", "--model", str(tiny_dir), "--batch-size", "0")
    assert proc.returncode == 2 and "must be positive" in proc.stderr


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
    monkeypatch.setattr(cli, "cmd_accuracy", _out_of_memory)
    monkeypatch.setattr(circuit_stage, "cmd_circuit", _out_of_memory)
    assert cli.main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: out of memory on ")
    for part in knobs:
        assert part in err
    if command[0] == "accuracy":
        assert "--max-rows" not in err
