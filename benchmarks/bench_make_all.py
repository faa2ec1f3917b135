"""The time of each stage of `make all` on the model organism (install excluded): the Makefile's
targets circuit (path patching, sweep, Table 1, figures), dcm, cmap, knockout and report, run in
turn into a temporary RESULTS / FIGURES. Prints one line per stage and last
`make all seconds=<total>` (goal: at most 300 on 2 cores).

    python benchmarks/bench_make_all.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("circuit", "dcm", "cmap", "knockout", "report")


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=Path, default=None, help="write the results here (default: a temporary folder)")
    args = p.parse_args(argv)
    out = args.keep or Path(tempfile.mkdtemp(prefix="et-make-all-"))
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    total = 0.0
    for stage in STAGES:
        t0 = time.perf_counter()
        subprocess.run(
            [
                "make",
                "-C",
                str(ROOT),
                "-o",
                ".venv/.installed",
                stage,
                f"RESULTS={out / 'results'}",
                f"FIGURES={out / 'figures'}",
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - t0
        total += seconds
        print(f"make {stage}: {seconds:.1f}s", flush=True)
    print(f"make all seconds={total:.1f} (results under {out})")
    return total


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
