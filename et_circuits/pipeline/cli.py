"""Command line: `python -m et_circuits <command>` (or `torchrun --nproc_per_node N -m --
et_circuits <command>` to shard a stage over N processes, see `distributed`). Setup problems
(unknown model, missing weights, unavailable device, malformed files, impossible parameters)
and running out of GPU memory end in one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys

import torch

from et_circuits import models
from et_circuits.core import distributed
from et_circuits.core.errors import EtCircuitsError
from et_circuits.core.forward import measure
from et_circuits.tasks.entity_tracking import recipe
from et_circuits.tasks.entity_tracking.data import vocabulary

from .args import boxes, load_model, model_args, positive, settings
from .stages import STAGES


def cmd_accuracy(args: argparse.Namespace) -> None:
    model, tok, spec = load_model(args.model, args)
    vocab = vocabulary(tok, min_objects=args.boxes, min_labels=args.boxes)
    prompts = recipe.prompts(tok, vocab, args.n, args.boxes, args.seed)
    acc = measure(model, prompts, settings=settings(args))
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

    for stage in STAGES:
        stage.register(sub)
    return parser


def _where() -> str:
    """ " (rank r)" under torchrun, so that a failing rank's one line says which it is."""
    return f" (rank {distributed.rank()})" if distributed.world() > 1 else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own = getattr(args, "registry", None) is not None
    try:
        distributed.init()  # under torchrun: join the ranks (nothing otherwise)
        if own:
            models.use_registry(args.registry)
        args.func(args)
    except EtCircuitsError as e:
        print(f"error{_where()}: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        knobs = "--batch-size" + (" or --max-rows" if "max_rows" in args else "")
        print(
            f"error{_where()}: out of memory on {args.device or 'the default device'}; lower {knobs}", file=sys.stderr
        )
        return 2
    finally:
        if own:
            models.use_registry(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
