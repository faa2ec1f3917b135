"""What a running command needs from its arguments: the model on its device, split over its
GPUs and in its dtype, and its run settings."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TypeVar

from et_circuits import models
from et_circuits.core import distributed
from et_circuits.core.settings import FAST_ROWS, RunSettings, resolve_device

T = TypeVar("T")
U = TypeVar("U")


def per_model(fn: Callable[[U], T], model_args: Sequence[U], costs: Sequence[float] | None = None) -> list[T]:
    """[fn(m) for m in model_args] (a stage's models, or other whole units of its work). Under
    torchrun with at least as many models as ranks, each model is computed whole by one rank,
    balanced by estimated `costs` (`distributed.split`): nothing is repeated on every rank, and
    the ranks meet once, at the end. With fewer models than ranks every rank takes part in
    every model (its sharded loops). Every rank returns every result."""
    if distributed.world() > 1 and len(model_args) >= distributed.world():
        return distributed.split(fn, list(model_args), costs)
    return [fn(m) for m in model_args]


def settings(args: argparse.Namespace) -> RunSettings:
    """The run settings of a command's arguments: progress bars unless --quiet, under torchrun on
    rank 0 only (its own work units; the other ranks' bars would interleave with them)."""
    progress = not args.quiet and distributed.first_process()
    return RunSettings(args.batch_size, getattr(args, "max_rows", FAST_ROWS), progress=progress)


def load_model(name: str, args: argparse.Namespace, device: str | None = None):
    """(model, tokenizer, spec) for a command, on its device (or `device`), split over its
    --n-devices GPUs, in its dtype; with --quiet (or on a rank but the first), without
    transformers' loading bars."""
    if args.quiet or not distributed.first_process():
        from transformers.utils import logging

        logging.disable_progress_bar()
    device = resolve_device(device or args.device, args.n_devices)
    return models.load(name, device=device, dtype=args.dtype, n_devices=args.n_devices)
