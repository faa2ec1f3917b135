"""Stages `dcm` (DCM masks of one model) and `dcm-figure` (Figure 2 and RESULTS/dcm.csv).

`dcm --model M --base B` trains masks with M's weights on every group of the base circuit
RESULTS/B/circuit.json for the three main desiderata (Figure 2: the base circuit's functionality
in every model), plus the eleven extra desiderata on its group B (by default for the base model
only; `--extra all`: every model). When M != B it also trains on M's own circuit
RESULTS/M/circuit.json what CMAP patches (`recipe.SET_DESIDERATA`: A object value, B and C
positional; `--own all`: every group on the three main desiderata). Files:

- RESULTS/M/dcm_runs.json: every finished mask training, keyed by everything it depends on
  (heads, position, desideratum, seed, settings); a rerun reuses the ones that still apply and
  an interrupted run resumes where it stopped.
- RESULTS/M/dcm.json:
  {"model": M, "base": B, "settings": {...},
   "base_circuit": SECTION, "own_circuit": SECTION}     (identical sections when M == B)
  SECTION = {"circuit": <whose circuit.json>, "positions": {group: position},
             "group_heads": {group: [[layer, head], ...]},
             "groups": {group: {desideratum: ENTRY}}}
  ENTRY = {"heads": [[layer, head], ...]   the selected seed's heads (what CMAP patches),
           "selected_seed": s             the seed with the best eval accuracy (first on ties),
           "accuracy": [...]              test accuracy on each bootstrap resampling of the
                                          selected seed's test pairs (fractions),
           "accuracy_mean", "accuracy_std",
           "test_accuracy_mean", "test_accuracy_std"   over seeds (sample std),
           "seeds": {s: {"heads", "mask", "eval_accuracy", "test_accuracy", "best_step", "steps"}}}
  CMAP reads a group's heads for a desideratum as dcm["own_circuit"]["groups"][g][d]["heads"].
`dcm-figure` writes RESULTS/dcm.csv (one row per model x circuit x group x desideratum, accuracy
in %) and, under --figures (default figures/), dcm.{html,png} (Figure 2) and
dcm_extra.{html,png} (group B on the extra desiderata); `dcm --figures DIR` does the same for
its models in the training process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from et_circuits import presentation as figures
from et_circuits.core.circuit import Circuit
from et_circuits.core.digest import weights_digest
from et_circuits.core.distributed import rank
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import write_csv, write_json
from et_circuits.methods.dcm import DCMConfig
from et_circuits.models import result_name
from et_circuits.tasks.entity_tracking import desiderata, recipe
from et_circuits.tasks.entity_tracking.paper import letter

from .. import results
from ..results import SECTIONS, SECTIONS_OF, dcm_rows, read_dcm
from ..running import load_model, per_model, settings


def desiderata_of(
    args: argparse.Namespace, section: str, circuit: Circuit, is_base: bool
) -> dict[str, tuple[str, ...]]:
    """Which desiderata each group of a section's circuit is asked: on a base circuit the three
    main ones (plus, on the paper's circuit, the extra ones on group B, per --extra); on the
    model's own circuit what CMAP patches (per --own)."""
    if section.startswith("base"):
        asked = {group: desiderata.MAIN for group in circuit.groups}
        if section == "base_circuit" and (args.extra == "all" or (args.extra == "base" and is_base)):
            asked[recipe.EXTRA_GROUP] = desiderata.MAIN + tuple(desiderata.EXTRA)
        return asked
    if args.own == "all":
        return {group: desiderata.MAIN for group in circuit.groups}
    return {g: (d,) for g, d in recipe.SET_DESIDERATA.items() if d is not None and g in circuit.groups}


def cmd_dcm(args: argparse.Namespace) -> None:
    # one process for several models, each loaded once; under torchrun whole models over the
    # ranks, balanced by their mask trainings
    plan = plan_of(args)
    inputs = {m: inputs_of(m, args) for m in args.models}  # read once: for the costs and the runs
    costs = [trainings(inputs[m][1], plan) for m in args.models]
    per_model(lambda m: dcm_of(m, args, *inputs[m]), args.models, costs)
    if args.figures is not None and rank() == 0:  # Figure 2 of these models, in this process
        draw_dcm_figures(args.base, args.models, args.results, args.figures)


def plan_of(args: argparse.Namespace) -> recipe.DCMPlan:
    """The DCM settings of the command line."""
    config = DCMConfig(lam=args.lam, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size)
    seeds = tuple(args.seed + i for i in range(args.seeds))
    return recipe.DCMPlan(
        config,
        (args.n_train, args.n_eval, args.n_test),
        args.boxes,
        args.seed + recipe.SEED_OFFSETS["dcm"],
        seeds,
        args.resamples,
        args.seed,
    )


def inputs_of(model_arg: str, args: argparse.Namespace):
    """(circuits by section, asks by section) of one model, read before it is loaded."""
    name, base_name = result_name(model_arg), result_name(args.base)
    circuits = {}
    # the paper's reading always; the discovered one where the circuit stage wrote it
    readings = [r for r in SECTIONS_OF if r == "paper" or results.circuit_path(args.results, base_name, r).exists()]
    for reading in readings:
        base_section, own_section = SECTIONS_OF[reading]
        circuits[base_section] = (base_name, results.load_circuit(args.results, base_name, reading))
        if name != base_name:  # for the base model both sections are one and the same
            circuits[own_section] = (name, results.load_circuit(args.results, name, reading))
    planned = {
        section: recipe.asks_for(circuit, desiderata_of(args, section, circuit, name == base_name))
        for section, (_, circuit) in circuits.items()
    }
    return circuits, planned


def trainings(planned: dict, plan: recipe.DCMPlan) -> int:
    """How many mask trainings a model's DCM plans (asks without heads train none): its cost,
    estimated before the model is loaded."""
    asks = dict.fromkeys(ask for section in planned.values() for _, ask in section if ask.heads)
    return len(asks) * len(plan.seeds)


def dcm_of(model_arg: str, args: argparse.Namespace, circuits: dict, planned: dict) -> None:
    """One model's DCM masks on the base circuit and its own (`inputs_of`), written under
    RESULTS/<model>/."""
    name, base_name = result_name(model_arg), result_name(args.base)
    out = args.results / name
    readings = [r for r in SECTIONS_OF if SECTIONS_OF[r][0] in circuits]
    plan = plan_of(args)
    config, seeds = plan.config, plan.seeds
    model, tokenizer, _ = load_model(model_arg, args)
    for _, circuit in circuits.values():
        circuit.validate(model.cfg.n_layers, model.cfg.n_heads)
    runs = results.RunsFile(out / results.DCM_RUNS, plan, weights_digest(model))
    asks = [ask for section in planned.values() for _, ask in section]
    answers = recipe.run_dcm(
        model, tokenizer, asks, plan, settings=settings(args), finished=runs.finished, on_seed=runs.on_seed
    )
    runs.keep_only(answers)  # drop stale runs

    summary = {
        "model": name,
        "base": base_name,
        "settings": {
            "lam": config.lam,
            "lr": config.lr,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "n_train": args.n_train,
            "n_eval": args.n_eval,
            "n_test": args.n_test,
            "boxes": args.boxes,
            "seeds": list(seeds),
            "data_seed": plan.data_seed,
            "resamples": args.resamples,
        },
    }
    for section, asked in planned.items():
        owner, circuit = circuits[section]
        groups: dict[str, dict[str, dict]] = {}
        for group, ask in asked:
            groups.setdefault(group, {})[ask.desideratum] = results.dcm_entry(answers[ask])
        summary[section] = {
            "circuit": owner,
            "positions": circuit.to_dict()["positions"],
            "group_heads": {g: [list(h) for h in hs] for g, hs in circuit.groups.items()},
            "groups": groups,
        }
    for reading in readings:
        base_section, own_section = SECTIONS_OF[reading]
        summary.setdefault(own_section, summary[base_section])
    write_json(out / results.DCM, {k: summary[k] for k in ("model", "base", "settings", *SECTIONS) if k in summary})
    for reading in readings:
        base_section = SECTIONS_OF[reading][0]
        for group, by_desideratum in summary[base_section]["groups"].items():
            print(
                f"dcm {name} ({base_name} circuit, {reading} positions) {letter(group)}: "
                + " ".join(
                    f"{d}={e['accuracy_mean']:.2f}({len(e['heads'])}h)"
                    for d, e in by_desideratum.items()
                    if d in desiderata.MAIN
                )
            )


# ---------------------------------------------------------------------------------------------
# dcm-figure


def cmd_dcm_figure(args: argparse.Namespace) -> None:
    draw_dcm_figures(args.base, args.models, args.results, args.figures)


def draw_dcm_figures(base_arg: str, model_args: list[str], results_dir: Path, directory: Path | None) -> None:
    """RESULTS/dcm.csv and Figure 2 (with its discovered and extra panels) from the models'
    dcm.json files, all computed on `base_arg`'s circuit."""
    names = [result_name(m) for m in model_args]
    by_model = {n: read_dcm(results_dir / n / results.DCM) for n in names}
    base = result_name(base_arg)
    for n, result in by_model.items():
        if result.get("base") != base:
            raise CircuitError(
                f"{results_dir / n / results.DCM} was computed on {result.get('base')}'s circuit, not {base}'s; "
                f"rerun `python -m et_circuits dcm --model {n} --base {base_arg}`"
            )
    frame = pd.DataFrame([row for n in names for row in dcm_rows(n, by_model[n])])
    if frame.empty:
        raise CircuitError("the dcm.json files hold no results")
    write_csv(results_dir / results.DCM_CSV, frame)
    todo = [(results.stage_stem("dcm"), figures.figure2(frame))]
    if (frame.circuit == SECTIONS_OF["discovered"][0]).any():
        todo.append((results.stage_stem("dcm", "discovered"), figures.figure2(frame, SECTIONS_OF["discovered"][0])))
    if (frame.desideratum.isin(desiderata.EXTRA) & (frame.circuit == SECTIONS_OF["paper"][0])).any():
        todo.append((results.DCM_EXTRA_FIGURE, figures.extra_figure(frame)))
    figures.save_figures(todo, directory)
    main = frame[frame.circuit.isin(["base_circuit", "base_discovered"]) & frame.desideratum.isin(desiderata.MAIN)]
    for (circuit, model, group), rows in main.groupby(["circuit", "model", "letter"], sort=False):
        print(
            f"figure 2 ({circuit}) {model} {group}: "
            + " ".join(f"{r.desideratum}={r.accuracy_mean:.1f}±{r.accuracy_std:.1f}%" for r in rows.itertuples())
        )
