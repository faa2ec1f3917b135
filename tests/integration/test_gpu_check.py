"""`make gpu-check`'s script (benchmarks/gpu_check.py) rehearsed on CPU: its budgeted parts (cut,
error, not available, the JSON rewritten after every part) in process, and the script itself at
small sizes with a tiny budget, one part cut by its own budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from et_circuits.core.settings import RunSettings
from tests.conftest import benchmark_script

pytestmark = pytest.mark.xdist_group("processes-1")  # starts processes (make test: one per group at a time)

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"
BUDGET = 10.0  # seconds for all parts: most are cut, which is what the budgets are for


def test_budgeted_parts_cut_fail_and_save_after_each(tmp_path):
    """A part past its budget is cut and keeps its finished steps; a failing part records its
    error; the file on disk holds each finished part before the next one starts."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGALRM cuts only in the main thread")
    parts = benchmark_script("budgeted_parts")
    path = tmp_path / "run.json"
    report = parts.Report(path, {"what": "test"}, total=10.0, overrides={"slow": 0.3})
    seen = {}

    def slow(part):
        part.step("first", {"value": 1.0})
        time.sleep(5)  # cut by its 0.3 s budget
        part.step("never", {})

    def failing(part):
        seen["on_disk"] = json.loads(path.read_text())  # written before this part
        raise ValueError("broken\nsecond line")

    def unavailable(part):
        raise parts.NotAvailable("no such method")

    t0 = time.perf_counter()
    cut = report.run("slow", "slow", 0.5, slow)
    assert time.perf_counter() - t0 < 2
    assert cut["status"] == "cut" and cut["finished"] == ["first"] and cut["steps"] == {"first": {"value": 1.0}}
    failed = report.run("group", "failing", 0.25, failing)
    assert seen["on_disk"]["slow"]["status"] == "cut"
    assert failed["status"] == "error" and failed["error"] == "ValueError: broken"
    assert any("broken" in line for line in failed["traceback"])
    # Unused time rolls over: the next part gets what is left of the 10 s (the cut part's 5 s
    # share was overridden to 0.3 s, and the failing part took next to nothing).
    assert 9 < report.run("group", "unavailable", 0.25, unavailable)["budget_s"] <= 9.7
    report.run("group", "unasked", 0.0, unavailable, skip="not asked for")
    rows = parts.summary_rows(report)
    report.close(rows)
    doc = json.loads(path.read_text())
    assert doc["finished"] and [r["status"] for r in doc["summary"]] == ["cut", "error", "not available", "skipped"]
    assert doc["group"]["unavailable"]["reason"] == "no such method"
    table = parts.format_table(rows).splitlines()
    assert table[0].split() == ["part", "status", "s", "/", "budget", "check", "result"] and len(table) == 5
    assert "cut after first" in table[1]


def test_out_of_memory_is_retried_once_with_fewer_rows():
    """The fast sweep's answer to running out of GPU memory, rehearsed: the pass is tried again
    with a quarter of the rows and half the batch (kept for the later parts), and said so."""
    gpu_check = benchmark_script("gpu_check")
    bench = gpu_check.Bench(None, "cpu", gpu_check.Sizes.of(True, False), torch.float32, RunSettings(32, 4096))
    part = _Record()
    tried = []

    def fn(settings):
        tried.append((settings.batch_size, settings.max_rows))
        if len(tried) == 1:
            raise torch.OutOfMemoryError("simulated")
        return "scores"

    assert gpu_check.with_fewer_rows(bench, part, fn) == "scores"
    assert tried == [(32, 4096), (16, 1024)] and bench.settings.max_rows == 1024
    assert part.values["out_of_memory_at"] == {"batch_size": 32, "max_rows": 4096}

    def always(settings):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):  # a second failure is the part's error
        gpu_check.with_fewer_rows(bench, part, always)


def test_prompts_and_dcm_pairs_shrink_to_the_budget():
    gpu_check = benchmark_script("gpu_check")
    # 300 prompts, 1 s per plain forward: the sweep's ~160 forwards fit a 200 s budget ...
    assert gpu_check.prompts_that_fit(300, 1.0, 200.0, 32) == 300
    # ... but not 100 s: 80% of it buys 150 prompts; never fewer than one batch.
    assert gpu_check.prompts_that_fit(300, 1.0, 100.0, 32) == 150
    assert gpu_check.prompts_that_fit(300, 1.0, 1.0, 32) == 32
    paper = (1000, 500, 500)
    assert gpu_check.dcm_sizes_that_fit(paper, 1e-3, 100.0) == paper
    assert gpu_check.dcm_sizes_that_fit(paper, 1e-2, 40.0) == (350, 175, 175)  # 70% of 40 s of 80 s
    assert gpu_check.dcm_sizes_that_fit(paper, 1.0, 1.0) == (64, 32, 64)


def test_attribution_parts_run(tmp_path, capsys):
    """The two attribution parts with path_patch(method="attribution"): they run, the device
    check passes, the four steps' ranking is compared with the fast sweep's, and the attribution
    position sweep over every token is timed with its peak memory."""
    gpu_check = benchmark_script("gpu_check")
    assert gpu_check.attribution_available()
    out = tmp_path / "attribution.json"
    parts = ["correctness.attribution", "geometry.build", "geometry.fast_sweep", "geometry.attribution"]
    assert gpu_check.main(["--device", "cpu", "--small", "--parts", *parts, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    check, sweep = doc["correctness"]["attribution"], doc["geometry"]["attribution"]
    assert check["status"] == "done" and check["pass"] is True and len(check["finished"]) == 4
    assert sweep["status"] == "done" and sweep["finished"][-1] == "position_sweep" and len(sweep["finished"]) == 5
    steps = [v for k, v in sweep["steps"].items() if k != "position_sweep"]
    assert all(step["spearman_fast"] is None or -1 <= step["spearman_fast"] <= 1 for step in steps)
    assert sweep["steps"]["position_sweep"]["seconds"] > 0 and sweep["steps"]["position_sweep"]["positions"] > 0
    assert "geometry.attribution" in capsys.readouterr().out


class _Record:
    """A part's `set`, for functions that only record."""

    def __init__(self):
        self.values = {}

    def set(self, **values):
        self.values.update(values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error path is not reachable")
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    assert benchmark_script("gpu_check").main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "cuda" in err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_cpu_rehearsal_with_a_tiny_budget(tmp_path):
    """`--device cpu --small` with a 10 s budget and the fast sweep given 1 ms: every section and
    part is in the JSON, the sweep is cut, no part fails, attribution says it is not available
    (until issue 28 lands), and the summary table is printed."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--small",
            "--budget",
            str(BUDGET),
            "--part-budget",
            "geometry.fast_sweep=0.001",
            "--part-budget",
            "environment=60",  # never cut: its fields are checked below
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["finished"] and doc["device"] == "cpu" and doc["small"] and doc["budget_s"] == BUDGET
    gpu_check = benchmark_script("gpu_check")
    assert set(doc) >= {"environment", "correctness", "geometry", "summary"}
    assert list(doc["correctness"]) == ["path_patching", "table1", "dcm", "cmap", "attribution"]
    assert list(doc["geometry"]) == ["build", "forward", "fast_sweep", "reference", "dcm_epoch", "cmap", "attribution"]
    assert [r["part"] for r in doc["summary"]] == list(gpu_check.PART_KEYS)

    env = doc["environment"]
    assert env["status"] == "done" and env["device"] == "cpu" and env["bf16_matmul_ok"] is True
    sweep = doc["geometry"]["fast_sweep"]
    assert sweep["status"] == "cut" and sweep["budget_s"] == 0.001 and isinstance(sweep["finished"], list)
    records = [*doc["correctness"].values(), *doc["geometry"].values()]
    statuses = {r["status"] for r in records}
    assert statuses <= {"done", "cut", "not available", "skipped"}, [r.get("error") for r in records]
    # Each part ends at its deadline, a cleanup later, and none is planned past the whole budget.
    assert sum(r["seconds"] for r in records) <= BUDGET + 0.5 * len(records)
    if gpu_check.attribution_available():
        assert doc["correctness"]["attribution"]["status"] in {"done", "cut"}
    else:
        assert doc["correctness"]["attribution"]["status"] == "not available"
        assert doc["geometry"]["attribution"]["status"] in {"not available", "skipped"}
    for r in records:
        if r["status"] == "done" and "pass" in r:
            assert r["pass"] is True  # device == CPU here: every check that finished passes
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("part "))
    assert [line.split()[0] for line in lines[head + 1 : head + 14]] == list(gpu_check.PART_KEYS)
    assert lines[-1].startswith(f"wrote {out}")
