"""The Makefile reruns only what is stale: it runs in a temporary copy with its CLI replaced by a
stub (this file, run as a script) that writes each command's output files and logs the call."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("processes-2")  # starts processes (make test: one per group at a time)


ROOT = Path(__file__).resolve().parents[2]
MODELS = ["organism-llama", "organism-vicuna", "organism-goat", "organism-float"]  # the Makefile's default
MAKE_ENV = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ET_CIRCUITS_FIGURES")  # not inherited


def outputs(a: argparse.Namespace) -> list[str]:
    """The files each command of the real CLI writes (and the Makefile names as its targets);
    table1 and dcm also draw their stage's figures when given --figures."""
    r, f = a.results, a.figures
    circuit_figures = [
        f"{f}/{m}_{what}.json"
        for m in a.models or []
        for what in ("path_patching", "discovered_path_patching", "sweep")
    ]
    circuit_figures += [f"{f}/{a.base}_circuit.json", f"{f}/{a.base}_discovered_circuit.json", f"{f}/table1.json"]
    dcm_figures = [f"{r}/dcm.csv", f"{f}/dcm.json", f"{f}/dcm_discovered.json"]
    drawn = f is not None
    return {
        "circuit": [f"{r}/{m}/{sub}circuit.json" for m in a.models or [] for sub in ("", "discovered/")],
        "table1": [f"{r}/table1.csv", f"{r}/table1.md", f"{r}/overlap.csv"] + (circuit_figures if drawn else []),
        "figures": circuit_figures,
        "dcm": [f"{r}/{m}/dcm.json" for m in a.models or []] + (dcm_figures if drawn else []),
        "dcm-figure": dcm_figures,
        "cmap": [f"{r}/cmap.csv", f"{f}/cmap.json", f"{f}/cmap_discovered.json"],
        "knockout": [f"{r}/knockout.csv", f"{f}/knockout.json"],
        "report": [f"{f}/report.html"],
    }[a.command]


def stub(log: str, argv: list[str]) -> None:
    """Stand-in for `python -m et_circuits`: log the call (one line per process, its commands
    joined by "then"), write each command's outputs."""
    p = argparse.ArgumentParser()
    p.add_argument("command")
    for name in ("--base", "--results", "--figures"):
        p.add_argument(name)
    p.add_argument("--models", "--model", dest="models", nargs="+")
    commands = " ".join(argv).split(" --then ")
    called = []
    for command in commands:
        a, _ = p.parse_known_args(command.split())
        run_on = a.models if a.command in ("circuit", "dcm", "knockout") else []  # the models a stage runs on
        called.append(" ".join([a.command] + (run_on or [])))
        for path in outputs(a):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(a.command)
    with open(log, "a") as f:
        f.write(" then ".join(called) + "\n")


@pytest.fixture
def project(tmp_path) -> Path:
    """A directory holding the Makefile and a finished install (its stamp newer than pyproject.toml)."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    stamp.write_text("")
    os.utime(tmp_path / "pyproject.toml", (time.time() - 60,) * 2)
    return tmp_path


def make(project: Path, *args: str) -> tuple[int, list[str]]:
    """Run make in `project` with the stub CLI; (exit status, the commands it called)."""
    log = project / "calls.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
    cli = f"{sys.executable} {Path(__file__).resolve()} {log}"
    proc = subprocess.run(
        ["make", "-C", str(project), f"CLI={cli}", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: `make -q` saying "not up to date"
    return proc.returncode, sorted(log.read_text().splitlines()) if log.exists() else []


def touch(path: Path) -> None:
    """Make `path` newer than anything make has written."""
    future = time.time() + 10
    os.utime(path, (future, future))


CIRCUIT_STAGE = f"circuit {' '.join(MODELS)} then table1"  # discovery, then Table 1 in one process
EVERY_STAGE = sorted(  # one process per stage, several models in one for circuit and dcm; the
    # circuit stage and dcm draw their own figures
    [CIRCUIT_STAGE, f"dcm {' '.join(MODELS)}", "cmap", f"knockout {MODELS[0]}", "report"]
)


def test_first_run_calls_every_stage_once_and_the_second_nothing(project):
    assert make(project, "-j4", "all") == (0, EVERY_STAGE)
    assert (project / "figures" / "report.html").exists()
    assert make(project, "-q", "all") == (0, [])
    for target in ("cmap", "dcm", "figures", "report", "all"):
        assert make(project, target) == (0, []), target


def test_a_new_circuit_reruns_what_reads_it(project):
    make(project, "all")
    touch(project / "results" / "organism-goat" / "circuit.json")
    assert make(project, "-q", "all")[0] == 1
    # one DCM process for every model (it reuses each finished mask training)
    assert make(project, "all") == (0, ["cmap", f"dcm {' '.join(MODELS)}", "report", "table1"])
    touch(project / "results" / "organism-llama" / "discovered" / "circuit.json")
    assert make(project, "-q", "knockout")[0] == 1  # knockout reads the base's discovered circuit
    assert make(project, "dcm") == (0, [f"dcm {' '.join(MODELS)}"])


def test_a_missing_figure_redraws_only_its_stage(project):
    make(project, "all")
    (project / "figures" / "cmap.json").unlink()
    assert make(project, "all") == (0, ["cmap", "report"])
    (project / "figures" / "table1.json").unlink()  # drawn by table1, alone when the circuits are fresh
    assert make(project, "figures") == (0, ["table1"])
    (project / "results" / "organism-float" / "discovered" / "circuit.json").unlink()
    assert make(project, "figures") == (0, [CIRCUIT_STAGE])  # Table 1 once, after the circuits


if __name__ == "__main__":
    stub(sys.argv[1], sys.argv[2:])
