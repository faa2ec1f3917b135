"""The loading-memory benchmark (benchmarks/bench_loading.py) runs on a tiny checkpoint and
prints its result line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("processes-2")  # starts processes (make test: one per group at a time)


ROOT = Path(__file__).resolve().parents[2]


def test_loading_benchmark_runs_small():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_loading.py"), "--small"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^loading peak_rss_ratio=\d+\.\d+ after_forward_ratio=\d+\.\d+$", proc.stdout, re.M), proc.stdout
