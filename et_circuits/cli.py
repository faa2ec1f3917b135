"""Command line: `python -m et_circuits <command>`. Setup problems (unknown model, missing
weights, malformed circuit file, impossible parameters) and running out of GPU memory end in
one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable
from pathlib import Path

import torch

from . import data, metrics, models
from .circuit import CircuitError
from .data import DataError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_args(p: argparse.ArgumentParser) -> None:
    """Arguments every model-running command takes."""
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive, default=32, help="prompts per forward pass")


def results_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"))


def figures_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--figures", type=Path, default=None, help="output directory (default: figures/)")


def load_model(name: str, args: argparse.Namespace):
    """(model, tokenizer, spec) for a CLI command, with the command's device and dtype.

    Organism-sized models run on one CPU thread: their tiny matrices gain nothing from more
    and lose much when the cores are shared.
    """
    torch.manual_seed(args.seed)
    model, tokenizer, spec = models.load(name, device=args.device, dtype=DTYPES[args.dtype])
    if str(model.cfg.device) == "cpu" and model.cfg.d_model <= 512:
        torch.set_num_threads(1)
    return model, tokenizer, spec


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


def cmd_accuracy(args: argparse.Namespace) -> None:
    model, tok, spec = load_model(args.model, args)
    vocab = data.vocabulary(tok, min_objects=args.boxes, min_labels=args.boxes)
    batch = data.make_batch(tok, data.sample_prompts(vocab, args.n, args.boxes, args.seed))
    acc = metrics.accuracy(model, batch, batch_size=args.batch_size)
    print(f"{spec.name} accuracy={acc:.3f} n={args.n}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="et_circuits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("accuracy", help="entity-tracking accuracy of one model")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=positive, default=500)
    p.add_argument("--boxes", type=boxes, default=7)
    model_args(p)
    p.set_defaults(func=cmd_accuracy)

    from .stages import STAGES

    for stage in STAGES:
        stage.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (models.SetupError, DataError, CircuitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        knobs = "--batch-size" + (" or --max-rows" if "max_rows" in args else "")
        print(f"error: out of memory on {args.device or 'the default device'}; lower {knobs}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
