"""Scaling out: each target of `make all` (circuit with Table 1 and its figures, dcm, cmap,
knockout, report) at make all's sizes, as one process with one thread and as two torchrun ranks
with one thread each. Each side runs `--runs` pipelines of its own (temporary RESULTS /
FIGURES), stage by stage in turn, one process then ranks, so that a drift in the machine's speed
(this shared 2-core machine varies by a quarter within an hour) hits both alike; a stage counts
its least wall time on each side. Per stage it prints both wall times, the speed-up, every
run's times, the busy-time speed-up (CPU seconds of the one process against the busiest rank's:
less sensitive to other work on the machine, but blind to torchrun's own start and to the
browser that draws PNGs), and each rank's CPU seconds and time in the sharded loops against its
wait for the other rank (from $ET_CIRCUITS_BUSY_LOG); last `make all speedup=<x>` (goals: 1.6x
on circuit and dcm, 1.3x on make all, with 2 free cores). After each stage it checks that the
ranks wrote what one process wrote (exit status 1 if not).

    python benchmarks/bench_scaling.py [--ranks 2] [--runs 2] [--stages circuit dcm] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("circuit", "dcm", "cmap", "knockout", "report")
BUSY_LOG = "ET_CIRCUITS_BUSY_LOG"


def run_stage(stage: str, out: Path, launch: str | None) -> tuple[float, list[dict]]:
    """(wall seconds, the busy log's lines) of `make <stage>` into `out`."""
    log = out / f"busy_{stage}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **{BUSY_LOG: str(log)})
    make = ["make", "-C", str(ROOT), "-o", ".venv/.installed", stage]
    make += [f"RESULTS={out / 'results'}", f"FIGURES={out / 'figures'}"] + ([f"LAUNCH={launch}"] if launch else [])
    start = time.perf_counter()
    with open(out / f"{stage}.log", "w") as output:
        done = subprocess.run(make, env=env, stdout=output, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"make {stage} failed; its output: {out / f'{stage}.log'}")
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return seconds, lines


def content(path: Path):
    """What must match between one process and the ranks: a file's bytes; a safetensors file's
    tensors and metadata (which safetensors writes in no fixed order); dcm_runs.json without the
    seconds of each training."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
    if path.name == "dcm_runs.json":
        return {k: {f: v for f, v in run.items() if f != "seconds"} for k, run in json.loads(path.read_text()).items()}
    return path.read_bytes()


def result_files(root: Path) -> set[str]:
    """Every file under `root` that one process and the ranks must write alike (PNG and HTML
    renderings left out: plotly names HTML elements at random; the figures' JSON counts)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix not in (".png", ".html")}


def differing(one: Path, many: Path) -> list[str]:
    """The result files that differ between the two runs' folders, or exist in one only."""
    a, b = result_files(one), result_files(many)
    return sorted((a ^ b) | {n for n in a & b if content(one / n) != content(many / n)})


def busy(lines: list[dict]) -> str:
    """Per rank over the stage's commands: CPU seconds, and seconds inside sharded loops / waiting."""
    ranks = sorted({x["rank"] for x in lines})
    parts = []
    for r in ranks:
        mine = [x for x in lines if x["rank"] == r]
        cpu = sum(x["cpu_s"] for x in mine)
        inside = sum(s for x in mine for loop in x["loops"] for _, s in loop["own"])
        wait = sum(loop["wait"] for x in mine for loop in x["loops"])
        parts.append(f"rank {r}: cpu {cpu:.1f}s, in loops {inside:.1f}s, waiting {wait:.1f}s")
    return "; ".join(parts)


def busiest(lines: list[dict]) -> float:
    """The CPU seconds of the busiest rank over the stage's commands (less sensitive than wall
    time to other work on the machine; browsers drawing PNGs not counted)."""
    return max((sum(x["cpu_s"] for x in lines if x["rank"] == r) for r in {x["rank"] for x in lines}), default=0.0)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="torchrun ranks (default 2)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="only these (in make all's order)")
    p.add_argument(
        "--runs",
        type=int,
        default=2,
        help="pipelines per side, run stage by stage in turn; each stage's least wall time counts (default 2)",
    )
    p.add_argument("--keep", type=Path, default=None, help="write the results here (default: a temporary folder)")
    args = p.parse_args(argv)
    out = args.keep or Path(tempfile.mkdtemp(prefix="et-scaling-"))
    launch = f"{ROOT / '.venv/bin/torchrun'} --standalone --nproc_per_node {args.ranks}"
    totals, identical = [0.0, 0.0], True
    for stage in [s for s in STAGES if s in args.stages]:
        runs = []  # (1 process, ranks) per run: pipelines of their own, interleaved
        for r in range(args.runs):
            runs.append((run_stage(stage, out / f"one{r}", None), run_stage(stage, out / f"ranks{r}", launch)))
            wrong = [n for d in ("results", "figures") for n in differing(out / f"one{r}" / d, out / f"ranks{r}" / d)]
            if wrong:
                print(f"  run {r}: files NOT identical to one process: {', '.join(wrong)}", flush=True)
            identical = identical and not wrong
        (one, one_log), _ = min(runs, key=lambda run: run[0][0])
        _, (many, many_log) = min(runs, key=lambda run: run[1][0])
        totals = [totals[0] + one, totals[1] + many]
        each = "; ".join(f"{a[0]:.1f}s / {b[0]:.1f}s" for a, b in runs)
        print(f"{stage}: 1 process {one:.1f}s, {args.ranks} ranks {many:.1f}s, speedup={one / many:.2f}", flush=True)
        same = "yes" if identical else "NO"
        print(f"  each run (1 process / {args.ranks} ranks): {each}; files identical to one process: {same}")
        if busiest(many_log):
            print(f"  busy-time speedup={busiest(one_log) / busiest(many_log):.2f} (CPU: 1 process / busiest rank)")
        print(f"  1 process: {busy(one_log)}", flush=True)
        print(f"  {args.ranks} ranks: {busy(many_log)}", flush=True)
    print(f"make all: 1 process {totals[0]:.1f}s, {args.ranks} ranks {totals[1]:.1f}s (results under {out})")
    print(f"make all speedup={totals[0] / totals[1]:.2f}")
    return identical


if __name__ == "__main__":
    sys.exit(0 if main() else 1)  # 1: some file differs from one process's
