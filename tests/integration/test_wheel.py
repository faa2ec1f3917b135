"""A plain (non-editable) install carries the model organism: the wheel built from this checkout,
installed into a fresh virtual environment, runs a stage from a directory outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)


ROOT = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "README.md", "et_circuits")  # what the wheel is built from
ACCURACY_LINE = re.compile(r"^organism-llama accuracy=0\.\d{3} n=50$")


CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (without the caller's PYTHONPATH, which could make the checkout importable)."""
    kwargs.setdefault("env", CLEAN_ENV)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(tmp: Path) -> Path:
    """The checkout's wheel, built offline from a copy of its sources (an in-tree build would
    leave build/ behind, whose stale files later wheels pick up)."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        tmp / "dist",
        src,
    )
    (wheel,) = (tmp / "dist").glob("et_circuits-*.whl")
    return wheel


def install_into_fresh_venv(wheel: Path, path: Path) -> Path:
    """A new virtual environment holding the wheel, which then also sees this interpreter's
    installed dependencies (torch, ...) but not its editable et_circuits: plain path lines in a
    .pth file add those directories without running the .pth files in them (the editable
    install's finder is one). The wheel goes in first, so pip sees no et_circuits already there.
    Returns the environment's python."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(purelib) / "shared_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.mark.slow
def test_wheel_runs_the_organism_outside_the_checkout(tmp_path):
    python = install_into_fresh_venv(build_wheel(tmp_path), tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = CLEAN_ENV | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    where = run(python, "-c", "import et_circuits; print(et_circuits.__file__)", cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout

    proc = run(
        python, "-m", "et_circuits", "accuracy", "--model", "organism-llama", "--n", "50", cwd=elsewhere, env=env
    )
    assert ACCURACY_LINE.match(proc.stdout.strip().splitlines()[-1]), proc.stdout
