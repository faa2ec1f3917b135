"""What a running command needs from its arguments: the model on its device, split over its
GPUs and in its dtype, and its run settings."""

from __future__ import annotations

import argparse

from et_circuits import models
from et_circuits.core.settings import FAST_ROWS, RunSettings, resolve_device


def settings(args: argparse.Namespace) -> RunSettings:
    """The run settings of a command's arguments."""
    return RunSettings(args.batch_size, getattr(args, "max_rows", FAST_ROWS), progress=not args.quiet)


def load_model(name: str, args: argparse.Namespace, device: str | None = None):
    """(model, tokenizer, spec) for a command, on its device (or `device`), split over its
    --n-devices GPUs, in its dtype; with --quiet, without transformers' loading bars."""
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    device = resolve_device(device or args.device, args.n_devices)
    return models.load(name, device=device, dtype=args.dtype, n_devices=args.n_devices)
