"""The stages behind the CLI: each module's `register(subparsers)` adds its commands, which
parse their arguments, call a recipe and write the files `results` names (read by the next
stage)."""

from . import circuit, cmap, dcm, knockout, report, table1

STAGES = [cmap, circuit, table1, dcm, knockout, report]
