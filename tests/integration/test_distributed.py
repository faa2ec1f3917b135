"""Stages sharded over two processes by torchrun (gloo, on CPU) write exactly what one process
writes; a failing rank ends the run non-zero with its one-line error and no result file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from et_circuits.pipeline import cli
from tests.conftest import benchmark_script

pytestmark = pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)


MODELS = ["organism-llama", "organism-goat"]
CIRCUIT = ["--n", "60", "--minimality-n", "30", "--reference-n", "60", "--completeness-random", "2", "--sweep-n", "30"]
DCM = ["--n-train", "128", "--n-eval", "48", "--n-test", "48", "--seeds", "2", "--resamples", "3", "--extra", "none"]
TABLE1 = ["--n", "60", "--reference-n", "60", "--random", "2"]
ROOT = "{root}"  # each run's folder, filled in per run
OUT = ["--results", f"{ROOT}/results", "--device", "cpu", "--quiet"]
DRAWN = [*OUT, "--figures", f"{ROOT}/figures"]
STAGES = [  # each command line in pipeline order, run by one process and by two
    # one model, fewer than the ranks: every rank takes part in the model (sharded loops)
    ["circuit", "--model", MODELS[0], *CIRCUIT, *OUT],
    # then, in the same processes (--then), as many models (or model x reading units) as ranks:
    # each computed whole by one rank
    ["circuit", "--model", MODELS[1], *CIRCUIT, *OUT, "--then", "table1", "--base", MODELS[0], "--models", *MODELS]
    + [*TABLE1, *OUT],
    ["dcm", "--model", *MODELS, "--base", MODELS[0], *DCM, *OUT],
    ["cmap", "--base", MODELS[0], "--models", MODELS[1], "--n", "60", *DRAWN],
    ["knockout", "--model", MODELS[0], "--n", "60", *DRAWN],
]


def torchrun(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m -- et_circuits <argv>`, one thread per rank
    (after `--` torchrun leaves every argument alone: it would read `--n` as one of its own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "--",
            "et_circuits",
            *argv,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for argv in STAGES:
        assert cli.main([a.replace(ROOT, str(one)) for a in argv]) == 0
        run = torchrun([a.replace(ROOT, str(two)) for a in argv])
        assert run.returncode == 0, run.stderr[-3000:]
    # the files must match as bench_scaling compares them: bytes, a safetensors file's tensors
    # and metadata, dcm_runs.json without the seconds of each training
    scaling = benchmark_script("bench_scaling")
    assert scaling.result_files(two) == scaling.result_files(one) and len(scaling.result_files(one)) > 30
    assert scaling.differing(one, two) == []
    assert any(
        h
        for e in json.loads((one / "results/organism-llama/dcm.json").read_text())["base_discovered"]["groups"].values()
        for d in e.values()
        for h in d["heads"]
    )  # DCM selected heads: the comparison is not of empty results


PLANTED = """
import os
if os.environ.get("RANK") == "1":
    import et_circuits.methods.knockout as k
    from et_circuits.core.errors import DataError

    def failing(*args, **kwargs):
        raise DataError("planted failure")

    k.knockout = failing
"""


@pytest.mark.slow
def test_a_failing_rank_exits_non_zero_with_its_line_and_writes_nothing(tmp_path):
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "sitecustomize.py").write_text(PLANTED)
    path = os.pathsep.join(filter(None, [str(tmp_path / "planted"), os.environ.get("PYTHONPATH")]))
    results = tmp_path / "results"
    run = torchrun(
        [
            "knockout",
            "--model",
            MODELS[0],
            "--n",
            "20",
            "--results",
            str(results),
            "--figures",
            str(tmp_path / "figures"),
            "--device",
            "cpu",
            "--quiet",
        ],
        {"PYTHONPATH": path},
    )
    assert run.returncode != 0
    assert "error (rank 1): planted failure" in run.stderr
    assert not (results / "knockout.csv").exists() and not (tmp_path / "figures").exists()
