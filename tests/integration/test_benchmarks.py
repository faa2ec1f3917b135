"""The benchmark scripts `make bench` runs, at small sizes: each runs, its methods agree, and its
last line is the ratio it reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_7b_geometry_benchmark_runs_small(capsys):
    result = benchmark_script("bench_7b_geometry").main(
        ["--small", "--n", "6", "--reference-senders", "4", "--runs", "2"]
    )
    first, second = result["runs"]
    assert result["speedup"] == (first["speedup"] + second["speedup"]) / 2  # the median of two
    for run in result["runs"]:
        assert run["fast_s"] > 0 and run["reference_s"] > 0
        assert min(run["largest"].values()) > 1e-4  # paper-like receivers: every step has effects
        assert run["max_diff"] < 1e-5
    assert first["sweep_s"] > 0 and 0 < first["sweep_share"]  # the position sweep runs once
    assert second["sweep_s"] != second["sweep_s"]  # NaN: not repeated
    last = _last_line(capsys.readouterr().out)
    assert last.startswith(f"7b_geometry speedup median of 2 runs={result['speedup']:.1f} ")


def test_path_patching_benchmark_runs_small():
    """As `make bench` runs it (a script of its own), on organism-llama with 8 prompts: fast and
    reference agree on every step, and the last line is the speedup."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_path_patching.py"), "--n", "8", "--batch-size", "8", "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    diffs = [float(x) for x in re.findall(r"max \|fast - reference\| = (\S+) ", out.stdout)]
    assert len(diffs) == 4 and max(diffs) < 1e-5  # one line per paper step
    totals = re.search(r"^reference (\S+)s, fast (\S+)s, max score difference (\S+)$", out.stdout, re.M)
    reference, fast, worst = map(float, totals.groups())
    assert worst == max(diffs)
    assert re.search(r"^position sweep: 12 positions x 4 layers", out.stdout, re.M)
    last = re.fullmatch(r"path_patching speedup=(\d+\.\d)", _last_line(out.stdout))
    assert last  # the speedup is reference / fast, within the rounding of the printed times and ratio
    speedup, half = float(last.group(1)), 0.005
    assert (reference - half) / (fast + half) - 0.05 <= speedup <= (reference + half) / (fast - half) + 0.05
    assert speedup > 1  # the fast method is faster even on 8 prompts


def test_dcm_benchmark_runs_small(tmp_path, capsys):
    """Without circuit results, on organism-llama's circuit as README reports it (3 groups x 3
    desiderata x 3 seeds): batched and one-at-a-time training select the same heads."""
    ratio = benchmark_script("bench_dcm").main(["--sizes", "16", "8", "16", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "batched: 27 masks in " in out and "one at a time: 27 masks in " in out
    assert "same selected heads and accuracies: True" in out
    assert ratio > 0 and _last_line(out) == f"dcm batching speedup={ratio:.2f}"


def test_attribution_benchmark_runs_small(capsys):
    """Screened vs exact at a small geometry (and the organism on few prompts): both lines in
    their form, with the numbers the run returns."""
    result = benchmark_script("bench_attribution").main(["--small", "--n", "6", "--organism-n", "24"])
    assert set(result["organism_same"]) == {"organism-llama", "organism-vicuna", "organism-goat", "organism-float"}
    assert result["forwards"] > 0 and result["exact_forwards"] > 0 and 0 <= result["recall"] <= 1
    assert result["positions"] == 54 and result["sweep_forwards"] > 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == f"sweep_attribution forwards={result['sweep_forwards']:.1f}"
    assert re.fullmatch(
        r"7b_geometry screened: forwards=[\d.]+ exact_forwards=[\d.]+ ratio=[\d.]+ recall=[\d.]+", lines[-1]
    )
    assert f"ratio={result['exact_forwards'] / result['forwards']:.1f}" in lines[-1]
