"""Stage `knockout`: attention knockout curves of one model (the paper's edges, and the last
token's reads at the positions of its discovered circuit), written to knockout.csv and the
`knockout` figure (names from `results`)."""

from __future__ import annotations

import argparse

import pandas as pd

from et_circuits import presentation as figures
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import write_csv
from et_circuits.methods.knockout import knockout
from et_circuits.models import result_name
from et_circuits.tasks.entity_tracking import recipe

from .. import results
from ..running import load_model, settings


def cmd_knockout(args: argparse.Namespace) -> None:
    if len(args.models) != 1:
        raise CircuitError(f"knockout runs on one model; got {len(args.models)}: {' '.join(args.models)}")
    model, tokenizer, _ = load_model(args.models[0], args)
    name = result_name(args.models[0])
    prompts = recipe.prompts_for("knockout", tokenizer, args.n, args.boxes, args.seed)
    prompts = recipe.with_random_context(prompts, args.seed)
    edges = list(recipe.EDGES)
    if results.circuit_path(args.results, name, "discovered").exists():  # also where the discovered groups act
        discovered = results.load_circuit(args.results, name, "discovered").validate(
            model.cfg.n_layers, model.cfg.n_heads
        )
        edges += [e for e in recipe.edges_to(discovered, prompts) if e.name not in {x.name for x in edges}]
    found = knockout(model, prompts, edges, settings=settings(args))
    frame = pd.DataFrame(results.knockout_rows(name, found))
    write_csv(args.results / results.KNOCKOUT_CSV, frame)
    figures.save_figures([(results.KNOCKOUT_FIGURE, figures.knockout_figure(frame))], args.figures)
    print(
        f"knockout {name}: full={found.full:.2f} "
        + " ".join(f"{e}=[{', '.join(f'{a:.2f}' for a in accs)}]" for e, accs in found.curves.items())
    )
