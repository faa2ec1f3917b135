"""Command line: `python -m et_circuits <command>` (or `torchrun --nproc_per_node N -m --
et_circuits <command>` to shard a stage over N processes). Commands joined by `--then` run in
order in one process (`circuit ... --then table1 ...`: one start and one import of torch fewer).
Every command's arguments are declared here, with defaults from modules that load no torch, so
`--help` and argument errors answer at once; the stage a command runs (`pipeline.stages`) is
imported after parsing. Setup problems (unknown model, missing weights, unavailable device,
malformed files, impossible parameters) and running out of GPU memory end in one line on stderr
and exit 2."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from et_circuits.core.errors import EtCircuitsError
from et_circuits.core.types import PATH_PATCHING_METHODS
from et_circuits.tasks.entity_tracking import paper

from .args import (
    base_arg,
    boxes,
    count,
    drawing_args,
    figures_arg,
    fraction,
    model_args,
    models_arg,
    non_negative_float,
    positive,
    positive_float,
    prompts_args,
    registry_arg,
    results_arg,
)


def _command(sub, name: str, run: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose work is `run` ("<stage module>:<function>" of pipeline.stages)."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(run=run)
    return p


def _accuracy(sub) -> None:
    p = _command(sub, "accuracy", "accuracy:cmd_accuracy", "entity-tracking accuracy of each model")
    models_arg(p, "the models to score")
    prompts_args(p, 500, "prompts")
    model_args(p)


def _circuit(sub) -> None:
    p = _command(
        sub, "circuit", "circuit:cmd_circuit", "path patching, top-k and minimality: RESULTS/<model>/circuit.json"
    )
    models_arg(p, "one or more models, in turn in one process")
    results_arg(p)
    model_args(p, max_rows=True)
    prompts_args(p, 300, "path-patching prompts (the paper's)")
    p.add_argument(
        "--top-k",
        type=positive,
        nargs=4,
        default=list(paper.PAPER_TOP_K),
        metavar=("A", "B", "C", "D"),
        help="heads kept per step (paper, Llama: 20 5 10 5; Goat/FLoat: 50 20 30 5)",
    )
    p.add_argument(
        "--top-k-cap",
        type=fraction,
        default=paper.TOP_K_CAP,
        help="at most this fraction of all heads per step, which only bites on small models (default %(default)s)",
    )
    p.add_argument(
        "--method", choices=PATH_PATCHING_METHODS, default="fast", help="path patching (default %(default)s)"
    )
    p.add_argument(
        "--screen",
        type=positive,
        default=None,
        metavar="N",
        help="attribution for every sender, exact path patching for the N it ranks first; groups are chosen "
        "from the exact scores (default: exact for every sender, the paper's method)",
    )
    p.add_argument(
        "--ig-steps", type=positive, default=1, help="attribution's gradient points when screening (default 1)"
    )
    p.add_argument("--minimality-n", type=positive, default=100, help="prompts for minimality (default %(default)s)")
    p.add_argument(
        "--minimality-threshold",
        type=fraction,
        default=0.03,
        help="accuracy change that keeps a head (default %(default)s)",
    )
    p.add_argument("--reference-n", type=positive, default=500, help="prompts for the ablation means (default 500)")
    p.add_argument("--completeness-random", type=count, default=10, help="random K sets for completeness (default 10)")
    p.add_argument(
        "--sweep-n", type=positive, default=100, help="prompts of the position sweep, the first path-patching ones"
    )
    p.add_argument(
        "--mark",
        type=fraction,
        default=0.2,
        help="the sweep marks positions whose effect is at least this share of the largest (default %(default)s)",
    )


def _table1(sub) -> None:
    p = _command(sub, "table1", "table1:cmd_table1", "the base circuit on every model (Table 1) and circuit overlap")
    base_arg(p, "the model whose circuit is evaluated")
    models_arg(p, "the models it is evaluated on")
    results_arg(p)
    model_args(p)
    prompts_args(p, 500, "evaluation prompts (the paper's)")
    p.add_argument("--reference-n", type=positive, default=500, help="prompts for the ablation means (default 500)")
    p.add_argument("--random", type=positive, default=10, help="random circuits for the baseline (default 10)")
    figures_arg(p, "also draw the circuit stage's figures, as the `figures` command does; ")

    p = _command(sub, "figures", "table1:cmd_figures", "path-patching heatmaps, circuit diagrams, Table 1 figure")
    drawing_args(p, "the model whose circuit diagrams are drawn")


def _dcm(sub) -> None:
    p = _command(sub, "dcm", "dcm:cmd_dcm", "DCM masks on the base circuit's and each model's own circuit's groups")
    models_arg(p, "one or more models, in turn in one process")
    base_arg(p, "the model whose circuit Figure 2 uses")
    p.add_argument("--seeds", type=positive, default=3, help="mask trainings per group and desideratum (default 3)")
    n_train, n_eval, n_test = paper.DCM_SPLIT_SIZES
    p.add_argument("--n-train", type=positive, default=n_train, help="training pairs (default %(default)s)")
    p.add_argument("--n-eval", type=positive, default=n_eval, help="pairs that select the mask (default %(default)s)")
    p.add_argument(
        "--n-test", type=positive, default=n_test, help="pairs of the reported accuracy (default %(default)s)"
    )
    p.add_argument("--epochs", type=positive, default=2, help="training epochs (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="Adam's learning rate (default %(default)s)")
    p.add_argument("--lam", type=non_negative_float, default=0.01, help="sparsity weight lambda (default %(default)s)")
    p.add_argument("--boxes", type=boxes, default=7, help="boxes per prompt (default %(default)s, the paper's)")
    p.add_argument("--resamples", type=positive, default=10, help="bootstrap resamplings of the test pairs")
    p.add_argument(
        "--extra",
        choices=("base", "all", "none"),
        default="base",
        help="models that also run the eleven extra desiderata on group B: the base model "
        "only (default), every model, or none",
    )
    p.add_argument(
        "--own",
        choices=("cmap", "all"),
        default="cmap",
        help="on the model's own circuit, only what CMAP patches (A: object value, B and C: "
        "positional; default) or every group on the three main desiderata",
    )
    model_args(p)
    results_arg(p)
    figures_arg(p, "also write RESULTS/dcm.csv and Figure 2 of these models, as `dcm-figure` does; ")

    p = _command(sub, "dcm-figure", "dcm:cmd_dcm_figure", "Figure 2 and RESULTS/dcm.csv from every model's dcm.json")
    drawing_args(p, "the model whose circuit the dcm.json files were computed on")


def _cmap(sub) -> None:
    p = _command(sub, "cmap", "cmap:cmd_cmap", "Figure 3: patch fine-tuned heads into the base model")
    base_arg(p, "the model patched into")
    models_arg(p, "fine-tuned models, the sources (the base is skipped)")
    p.add_argument(
        "--source-device",
        default=None,
        help="where the fine-tuned models go, e.g. cuda:1 with the base on cuda:0 (default: --device)",
    )
    prompts_args(p, 500, "prompts")
    p.add_argument(
        "--input-sets",
        nargs="*",
        choices=paper.CMAP_SETS,
        default=["A"],
        help="head sets also input-patched (q, k, v, qk, qkv); default A, as in the paper",
    )
    model_args(p)
    results_arg(p)
    figures_arg(p)


def _knockout(sub) -> None:
    p = _command(sub, "knockout", "knockout:cmd_knockout", "attention knockout: accuracy vs first blocked layer")
    models_arg(p, "the model (one)")
    prompts_args(p, 500, "prompts")
    model_args(p)
    results_arg(p)
    figures_arg(p)


def _report(sub) -> None:
    p = _command(sub, "report", "report:cmd_report", "one HTML page of the run, beside the paper's numbers")
    p.add_argument(
        "--models",
        "--model",
        dest="models",
        nargs="+",
        default=None,
        metavar="MODEL",
        help="the run's models, base first (default: those of RESULTS/table1.csv)",
    )
    results_arg(p)
    figures_arg(p)
    p.add_argument("--out", type=Path, default=None, help="the page (default: <figures>/report.html)")
    registry_arg(p)


COMMANDS = (_accuracy, _circuit, _table1, _dcm, _cmap, _knockout, _report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="et_circuits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for declare in COMMANDS:
        declare(sub)
    return parser


THEN = "--then"  # joins commands that run one after another in one process


def parse_commands(parser: argparse.ArgumentParser, argv: list[str]) -> list[argparse.Namespace]:
    """Each command of `argv` (commands joined by --then), all parsed before any runs, so that a
    mistake in the last one costs no work."""
    parts: list[list[str]] = [[]]
    for token in argv:
        if token == THEN:
            parts.append([])
        else:
            parts[-1].append(token)
    if len(parts) > 1 and not all(parts):
        parser.error(f"{THEN} joins two commands: `circuit ... {THEN} table1 ...`")
    return [parser.parse_args(part) for part in parts]


def main(argv: list[str] | None = None) -> int:
    """Run the command of `argv`, or several joined by --then in order in this one process: one
    start, one import of torch and the models, and under torchrun one meeting of the ranks
    (`make circuit` runs circuit --then table1: seconds fewer per stage)."""
    started, cpu_started = time.perf_counter(), 0.0  # the first command's CPU counts from the start
    commands = parse_commands(build_parser(), sys.argv[1:] if argv is None else list(argv))
    from et_circuits.core import distributed  # only now the heavy part: torch, the models, the methods

    ok = False
    try:
        distributed.init()  # under torchrun: join the ranks (nothing otherwise)
        where = f" (rank {distributed.rank()})" if distributed.world() > 1 else ""  # which rank failed
        for i, args in enumerate(commands):
            if i:  # what the ranks wrote for the last command is there before the next reads it
                distributed.barrier()
            code = run_command(args, where)
            log_busy(args.command, distributed, started, cpu_started)
            started, cpu_started = time.perf_counter(), time.process_time()
            if code:
                return code
        ok = True
    finally:
        distributed.finish(ok)  # under torchrun: every rank leaves together
    return 0


def run_command(args: argparse.Namespace, where: str) -> int:
    """One command's stage: 0, or 2 after a one-line error on stderr."""
    import torch

    from et_circuits import models

    own = getattr(args, "registry", None) is not None
    try:
        if own:
            models.use_registry(args.registry)
        module, function = args.run.split(":")
        getattr(importlib.import_module(f"et_circuits.pipeline.stages.{module}"), function)(args)
        return 0
    except EtCircuitsError as e:
        print(f"error{where}: {e}", file=sys.stderr)
    except torch.OutOfMemoryError:
        knobs = "--batch-size" + (" or --max-rows" if "max_rows" in args else "")
        print(f"error{where}: out of memory on {args.device or 'the default device'}; lower {knobs}", file=sys.stderr)
    finally:
        if own:
            models.use_registry(None)
    return 2


BUSY_LOG = "ET_CIRCUITS_BUSY_LOG"  # a file: each process appends where its time went (benchmarks)


def log_busy(command: str, distributed, started: float, cpu_started: float) -> None:
    """Under $ET_CIRCUITS_BUSY_LOG, one JSON line per process: its rank, wall and CPU seconds
    since the command started, and its time in each sharded loop (`distributed.LOOPS`)."""
    path = os.environ.get(BUSY_LOG)
    if path:
        line = {
            "command": command,
            "rank": distributed.rank(),
            "world": distributed.world(),
            "wall_s": round(time.perf_counter() - started, 3),
            "cpu_s": round(time.process_time() - cpu_started, 3),
            "loops": list(distributed.LOOPS),
        }
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    distributed.LOOPS.clear()  # the next command of this process logs its own


if __name__ == "__main__":
    sys.exit(main())
