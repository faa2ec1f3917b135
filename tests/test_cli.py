import os
import re
import subprocess
import sys



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
