"""Stage `report`: one self-contained HTML page of a run (default <figures>/report.html) with
every figure under --figures, every table under --results beside the paper's published numbers,
and the models and settings that produced them (`pipeline.report_tables`)."""

from __future__ import annotations

import argparse

from et_circuits.core.errors import SetupError
from et_circuits.core.io import atomic_path
from et_circuits.presentation import figures_dir, report

from .. import report_tables


def cmd_report(args: argparse.Namespace) -> None:
    if not args.results.is_dir():
        raise SetupError(f"no results at {args.results}; run `make all` first, or give --results the folder of a run")
    folder = args.figures or figures_dir()
    out = args.out or folder / "report.html"
    page = report_tables.build(args.results, folder, args.models)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    n = len(report.figure_stems(folder))
    print(f"report: {out} ({n} figures; open it in a browser, it needs no network)")
