"""What every command line shares: checked argument types and argument groups, with one
vocabulary for models (`--models`, alias `--model`; `--base`). Importing this module loads no
torch, so `--help` and argument errors answer at once."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from et_circuits.core.settings import FAST_ROWS

DTYPE_NAMES = ("float32", "bfloat16", "float16")
REGISTRY_VAR = "ET_CIRCUITS_REGISTRY"  # as models.registry reads it (checked by a test)


def _checked(name: str, convert: Callable[[str], float], ok: Callable[[float], bool], rule: str):
    """An argparse type: `convert` the text, refuse values that are not `ok` ("<rule>, got x")."""

    def check(value: str):
        x = convert(value)
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{rule}, got {x}")
        return x

    check.__name__ = name  # argparse names it in "invalid <name> value"
    return check


positive = _checked("positive", int, lambda n: n > 0, "must be positive")
count = _checked("count", int, lambda n: n >= 0, "must not be negative")
fraction = _checked("fraction", float, lambda x: 0 <= x <= 1, "must be between 0 and 1")
positive_float = _checked("positive_float", float, lambda x: x > 0, "must be positive")
non_negative_float = _checked("non_negative_float", float, lambda x: not x < 0, "must not be negative")
boxes = _checked("boxes", int, lambda n: 2 <= n <= 26, "number of boxes must be between 2 and 26")


def models_arg(p: argparse.ArgumentParser, help: str) -> None:
    """--models M [M ...] (also spelled --model): registry names or HF model directories."""
    p.add_argument("--models", "--model", dest="models", nargs="+", required=True, metavar="MODEL", help=help)


def base_arg(p: argparse.ArgumentParser, help: str = "the base model (registry name or directory)") -> None:
    p.add_argument("--base", required=True, metavar="MODEL", help=help)


def prompts_args(p: argparse.ArgumentParser, n: int, what: str) -> None:
    """--n (how many prompts) and --boxes (boxes per prompt)."""
    p.add_argument("--n", type=positive, default=n, help=f"{what} (default %(default)s)")
    p.add_argument("--boxes", type=boxes, default=7, help="boxes per prompt (default %(default)s, the paper's)")


def model_args(p: argparse.ArgumentParser, max_rows: bool = False) -> None:
    """Arguments every model-running command takes (`max_rows`: also the batched methods' knob)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--n-devices",
        type=positive,
        default=1,
        help="split each model's layers over this many GPUs from --device on (a model larger than one GPU)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=DTYPE_NAMES, help="weights and activations (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every prompt set and training (default %(default)s)")
    p.add_argument("--batch-size", type=positive, default=32, help="prompts per forward pass (default %(default)s)")
    if max_rows:
        p.add_argument(
            "--max-rows",
            type=positive,
            default=FAST_ROWS,
            help="rows per pass of the batched methods ((sender, prompt) rows in fast path patching): "
            "their memory knob; results do not depend on it (default %(default)s)",
        )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    registry_arg(p)


def registry_arg(p: argparse.ArgumentParser) -> None:
    """--registry FILE: your own models (a TOML registry file, as $ET_CIRCUITS_REGISTRY)."""
    p.add_argument(
        "--registry", type=Path, default=None, help=f"a TOML file naming your own models (default: ${REGISTRY_VAR})"
    )


def results_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"), help="result files (default %(default)s/)")


def figures_arg(p: argparse.ArgumentParser, also: str = "") -> None:
    p.add_argument(
        "--figures", type=Path, default=None, help=f"{also}figures go here (default: $ET_CIRCUITS_FIGURES or figures/)"
    )


def drawing_args(p: argparse.ArgumentParser, base_help: str) -> None:
    """The arguments of a command that draws from finished results (no model is loaded)."""
    base_arg(p, base_help)
    models_arg(p, "the models of the run")
    results_arg(p)
    figures_arg(p)
    registry_arg(p)
