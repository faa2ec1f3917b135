"""Stage `knockout`: attention knockout curves of one model (the paper's edges, and the last
token's reads at the positions of its discovered circuit), written to knockout.csv and the
`knockout` figure (names from `results`)."""

from __future__ import annotations

import argparse

import pandas as pd

from et_circuits import presentation as figures
from et_circuits.core.io import write_csv
from et_circuits.methods.knockout import knockout
from et_circuits.models import result_name
from et_circuits.tasks.entity_tracking import recipe

from .. import results
from ..args import boxes, figures_arg, load_model, model_args, positive, results_arg, settings


def cmd_knockout(args: argparse.Namespace) -> None:
    model, tokenizer, _ = load_model(args.model, args)
    name = result_name(args.model)
    prompts = recipe.prompts_for("knockout", tokenizer, args.n, args.boxes, args.seed)
    prompts = recipe.with_random_context(prompts, args.seed)
    edges = list(recipe.EDGES)
    if results.circuit_path(args.results, name, "discovered").exists():  # also where the discovered groups act
        discovered = results.load_circuit(args.results, name, "discovered")
        edges += [e for e in recipe.edges_to(discovered, prompts) if e.name not in {x.name for x in edges}]
    found = knockout(model, prompts, edges, settings=settings(args))
    frame = pd.DataFrame(results.knockout_rows(name, found))
    write_csv(args.results / results.KNOCKOUT_CSV, frame)
    figures.save_figures([(results.KNOCKOUT_FIGURE, figures.knockout_figure(frame))], args.figures)
    print(
        f"knockout {name}: full={found.full:.2f} "
        + " ".join(f"{e}=[{', '.join(f'{a:.2f}' for a in accs)}]" for e, accs in found.curves.items())
    )


def register(sub) -> None:
    p = sub.add_parser("knockout", help="attention knockout: accuracy vs first blocked layer")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=positive, default=500)
    p.add_argument("--boxes", type=boxes, default=7)
    model_args(p)
    results_arg(p)
    figures_arg(p)
    p.set_defaults(func=cmd_knockout)
