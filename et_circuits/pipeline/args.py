"""What every stage's command line shares: argument groups, checked argument types, and loading
a model with the command's device, dtype and run settings."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from et_circuits import models
from et_circuits.core.settings import FAST_ROWS, RunSettings, resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def model_args(p: argparse.ArgumentParser, max_rows: bool = False) -> None:
    """Arguments every model-running command takes (`max_rows`: also the batched methods' knob)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--n-devices",
        type=positive,
        default=1,
        help="split each model's layers over this many GPUs from --device on (a model larger than one GPU)",
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive, default=32, help="prompts per forward pass")
    if max_rows:
        p.add_argument(
            "--max-rows",
            type=positive,
            default=FAST_ROWS,
            help="rows per pass of the batched methods ((sender, prompt) rows in fast path patching): "
            "their memory knob",
        )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    registry_arg(p)


def registry_arg(p: argparse.ArgumentParser) -> None:
    """--registry FILE: your own models (a TOML registry file, as $ET_CIRCUITS_REGISTRY)."""
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help=f"a TOML file naming your own models (default: ${models.REGISTRY_VAR})",
    )


def results_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"))


def figures_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--figures", type=Path, default=None, help="output directory (default: figures/)")


def settings(args: argparse.Namespace) -> RunSettings:
    """The run settings of a command's arguments."""
    return RunSettings(args.batch_size, getattr(args, "max_rows", FAST_ROWS), progress=not args.quiet)


def load_model(name: str, args: argparse.Namespace, device: str | None = None):
    """(model, tokenizer, spec) for a command, on its device (or `device`), split over its
    --n-devices GPUs, in its dtype."""
    device = resolve_device(device or args.device, args.n_devices)
    return models.load(name, device=device, dtype=DTYPES[args.dtype], n_devices=args.n_devices)
