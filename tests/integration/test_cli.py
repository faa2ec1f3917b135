"""The command line running a model: `python -m et_circuits` in a fresh process (the entry
point, and a one-line error), and the accuracy line in-process."""

import os
import re
import subprocess
import sys

import pytest

from et_circuits.pipeline import cli


def run(capsys, *args):
    """(exit status, stdout, stderr) of `python -m et_circuits *args`, in-process."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)
def test_entry_point_runs_as_a_module(tiny_dir):
    """`python -m et_circuits` in a fresh process: the accuracy line, and a one-line error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "et_circuits",
            "accuracy",
            "--model",
            str(tiny_dir),
            "--n",
            "16",
            "--device",
            "cpu",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert re.fullmatch(rf"{tiny_dir.name} accuracy=\d\.\d{{3}} n=16", ok.stdout.strip().splitlines()[-1])
    bad = subprocess.run(
        [sys.executable, "-m", "et_circuits", "accuracy", "--model", "gpt-5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "gpt-5" in bad.stderr


def test_accuracy_line(tiny_dir, capsys):
    code, out, err = run(capsys, "accuracy", "--model", str(tiny_dir), "--n", "16", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert re.fullmatch(rf"{tiny_dir.name} accuracy=\d\.\d{{3}} n=16", out.strip().splitlines()[-1])
    assert "Loading" not in err and "%|" not in err  # --quiet: not even the weight-loading bar
