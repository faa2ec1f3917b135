"""Command `accuracy`: each model's entity-tracking accuracy on seeded prompts (the numbers of
the organism's model card)."""

from __future__ import annotations

import argparse

from et_circuits.core.forward import measure
from et_circuits.tasks.entity_tracking import recipe
from et_circuits.tasks.entity_tracking.data import vocabulary

from ..running import load_model, settings


def cmd_accuracy(args: argparse.Namespace) -> None:
    for name in args.models:
        model, tok, spec = load_model(name, args)
        vocab = vocabulary(tok, min_objects=args.boxes, min_labels=args.boxes)
        prompts = recipe.prompts(tok, vocab, args.n, args.boxes, args.seed)
        print(f"{spec.name} accuracy={measure(model, prompts, settings=settings(args)):.3f} n={args.n}")
