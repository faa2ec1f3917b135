"""Pipeline stages behind the CLI: each module has `register(subparsers)` adding its commands,
parses their arguments, calls a library recipe and writes the result files it owns under
RESULTS/ (read by the next stage)."""

from . import circuit, cmap, dcm, report

STAGES = [cmap, circuit, dcm, report]  # cmap also holds knockout
