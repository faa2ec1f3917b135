"""Stage `report`: one self-contained HTML page of a run (default <figures>/report.html) with
every figure under --figures, every table under --results beside the paper's published numbers,
and the models and settings that produced them (`pipeline.report_tables`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from et_circuits.core.io import atomic_path
from et_circuits.presentation import figures_dir, report

from .. import report_tables
from ..args import figures_arg, registry_arg, results_arg


def cmd_report(args: argparse.Namespace) -> None:
    folder = args.figures or figures_dir()
    out = args.out or folder / "report.html"
    page = report_tables.build(args.results, folder, args.models)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    n = len(report.figure_stems(folder))
    print(f"report: {out} ({n} figures; open it in a browser, it needs no network)")


def register(sub) -> None:
    p = sub.add_parser("report", help="one HTML page of the run: every figure and table, beside the paper's numbers")
    p.add_argument(
        "--models", nargs="+", default=None, help="the run's models, base first (default: those of RESULTS/table1.csv)"
    )
    results_arg(p)
    figures_arg(p)
    p.add_argument("--out", type=Path, default=None, help="the page (default: <figures>/report.html)")
    registry_arg(p)
    p.set_defaults(func=cmd_report)
