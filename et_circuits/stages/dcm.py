"""Stages `dcm` (DCM masks of one model) and `dcm-figure` (Figure 2 and RESULTS/dcm.csv).

`dcm --model M --base B` trains masks with M's weights on every group of the base circuit
RESULTS/B/circuit.json for the three main desiderata (Figure 2: the base circuit's functionality
in every model), plus the eleven extra desiderata on its group B (by default for the base model
only; `--extra all`: every model). When M != B it also trains on M's own circuit
RESULTS/M/circuit.json what CMAP patches (`cmap.SET_DESIDERATA`: A object value, B and C
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
dcm_extra.{html,png} (group B on the extra desiderata).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd
import torch

from .. import data, dcm, desiderata, figures
from ..circuit import GROUP_LETTERS, Circuit, CircuitError
from ..cmap import SET_DESIDERATA
from ..cli import (
    boxes, figures_arg, load_model, model_args, non_negative_float, positive, positive_float, results_arg,
)
from ..io import read_json, write_csv, write_json
from .circuit import result_name

DCM_SEED_OFFSET = 4  # the pairs are drawn with seed + 4, apart from the other stages' prompts
EXTRA_GROUP = "pos_transmitter"  # the group the extra desiderata test (group B)
SECTIONS = ("base_circuit", "own_circuit")
POSITIONS = ("last", "query_label", "prev_query_label")



def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# dcm


def _jobs(circuit: Circuit, desiderata_of: dict[str, tuple[str, ...]], seeds: list[int]):
    """(group, desideratum, job) for every group of `circuit` in `desiderata_of`, each of its
    desiderata and every seed."""
    for group, heads in circuit.groups.items():
        if circuit.positions[group] not in POSITIONS:
            raise CircuitError(f"group {group!r} acts at {circuit.positions[group]!r}; DCM knows {', '.join(POSITIONS)}")
        for name in desiderata_of.get(group, ()):
            for seed in seeds:
                yield group, name, dcm.Job(tuple(sorted(heads)), circuit.positions[group], name, seed)


def _entry(runs: dict[int, dict], n_resamples: int, seed: int) -> dict:
    """One (group, desideratum) of dcm.json from its per-seed results."""
    selected = max(runs, key=lambda s: (runs[s]["eval_accuracy"], -s))
    correct = torch.tensor([c == "1" for c in runs[selected]["test_correct"]])
    resampled = dcm.bootstrap(correct, n_resamples, seed)
    tests = [r["test_accuracy"] for r in runs.values()]
    return {
        "heads": runs[selected]["heads"],
        "selected_seed": selected,
        "accuracy": resampled,
        "accuracy_mean": statistics.fmean(resampled),
        "accuracy_std": _std(resampled),
        "test_accuracy_mean": statistics.fmean(tests),
        "test_accuracy_std": _std(tests),
        "seeds": {
            str(s): {k: r[k] for k in ("heads", "mask", "eval_accuracy", "test_accuracy", "best_step", "steps")}
            for s, r in runs.items()
        },
    }


def _read_runs(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        runs = read_json(path)
    except ValueError:
        print(f"warning: {path} is not valid JSON; starting DCM afresh", file=sys.stderr)
        return {}
    return runs if isinstance(runs, dict) else {}



def cmd_dcm(args: argparse.Namespace) -> None:
    name, base_name = result_name(args.model), result_name(args.base)
    out = args.results / name
    circuits = {"base_circuit": (base_name, Circuit.load(args.results / base_name / "circuit.json"))}
    if name != base_name:  # for the base model both sections are one and the same
        circuits["own_circuit"] = (name, Circuit.load(out / "circuit.json"))
    config = dcm.DCMConfig(lam=args.lam, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size)
    plan = dcm.Plan(config, (args.n_train, args.n_eval, args.n_test), args.boxes, args.seed + DCM_SEED_OFFSET)
    seeds = [args.seed + i for i in range(args.seeds)]

    model, tokenizer, _ = load_model(args.model, args)
    for _, circuit in circuits.values():
        circuit.validate(model.cfg.n_layers, model.cfg.n_heads)
    vocab = data.vocabulary(tokenizer, min_objects=args.boxes, min_labels=args.boxes)

    main = {group: desiderata.MAIN for group in circuits["base_circuit"][1].groups}
    if args.extra == "all" or (args.extra == "base" and name == base_name):
        main[EXTRA_GROUP] = desiderata.MAIN + tuple(desiderata.EXTRA)
    desiderata_of = {"base_circuit": main}
    if "own_circuit" in circuits:
        own_groups = circuits["own_circuit"][1].groups
        desiderata_of["own_circuit"] = (
            {group: desiderata.MAIN for group in own_groups} if args.own == "all"
            else {group: (d,) for group, d in SET_DESIDERATA.items() if d is not None and group in own_groups}
        )
    planned = {
        section: list(_jobs(circuit, desiderata_of[section], seeds)) for section, (_, circuit) in circuits.items()
    }
    runs_path = out / "dcm_runs.json"
    runs = _read_runs(runs_path)

    def save(key: str, result: dict) -> None:
        runs[key] = result
        write_json(runs_path, runs)

    all_jobs = [job for section in planned.values() for _, _, job in section]
    results = dcm.run_jobs(model, tokenizer, vocab, all_jobs, plan, runs, save, progress=not args.quiet)
    write_json(runs_path, results)  # drop runs that no longer apply

    summary = {
        "model": name,
        "base": base_name,
        "settings": {
            "lam": config.lam, "lr": config.lr, "epochs": config.epochs, "batch_size": config.batch_size,
            "n_train": args.n_train, "n_eval": args.n_eval, "n_test": args.n_test, "boxes": args.boxes,
            "seeds": seeds, "data_seed": plan.data_seed, "resamples": args.resamples,
        },
    }
    for section, jobs in planned.items():
        owner, circuit = circuits[section]
        per: dict[str, dict[str, dict[int, dict]]] = {}
        for group, desideratum, job in jobs:
            per.setdefault(group, {}).setdefault(desideratum, {})[job.seed] = results[plan.key(job)]
        summary[section] = {
            "circuit": owner,
            "positions": dict(circuit.positions),
            "group_heads": {g: [list(h) for h in hs] for g, hs in circuit.groups.items()},
            "groups": {
                g: {d: _entry(r, args.resamples, args.seed) for d, r in by_desideratum.items()}
                for g, by_desideratum in per.items()
            },
        }
    summary.setdefault("own_circuit", summary["base_circuit"])
    write_json(out / "dcm.json", summary)
    for group, by_desideratum in summary["base_circuit"]["groups"].items():
        print(
            f"dcm {name} ({base_name} circuit) {GROUP_LETTERS.get(group, group)}: "
            + " ".join(
                f"{d}={e['accuracy_mean']:.2f}({len(e['heads'])}h)"
                for d, e in by_desideratum.items() if d in desiderata.MAIN
            )
        )


# ---------------------------------------------------------------------------------------------
# dcm-figure


def _read_dcm(path: Path) -> dict:
    if not path.exists():
        raise CircuitError(f"no DCM result at {path}; run `make dcm` (python -m et_circuits dcm) first")
    try:
        result = read_json(path)
    except ValueError as e:
        raise CircuitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(result, dict) or not all(isinstance(result.get(s), dict) for s in SECTIONS):
        raise CircuitError(f"{path} is not a dcm.json (needs {' and '.join(SECTIONS)})")
    return result


def dcm_rows(name: str, result: dict) -> list[dict]:
    """CSV rows of one model's dcm.json (accuracies in %)."""
    rows = []
    for section in SECTIONS:
        part = result[section]
        try:
            for group, by_desideratum in part["groups"].items():
                for desideratum, e in by_desideratum.items():
                    rows.append({
                        "model": name,
                        "circuit": section,
                        "circuit_of": part["circuit"],
                        "group": group,
                        "letter": GROUP_LETTERS.get(group, group),
                        "position": part["positions"][group],
                        "desideratum": desideratum,
                        "group_size": len(part["group_heads"][group]),
                        "n_selected": len(e["heads"]),
                        "heads": " ".join(f"L{l}H{h}" for l, h in e["heads"]),
                        "accuracy_mean": round(100 * e["accuracy_mean"], 2),
                        "accuracy_std": round(100 * e["accuracy_std"], 2),
                        "test_accuracy_mean": round(100 * e["test_accuracy_mean"], 2),
                        "test_accuracy_std": round(100 * e["test_accuracy_std"], 2),
                        "n_seeds": len(e["seeds"]),
                        "n_resamples": len(e["accuracy"]),
                    })
        except (KeyError, TypeError, ValueError) as err:
            raise CircuitError(f"dcm.json of {name} is malformed ({section}: {err!r})") from None
    return rows


DESIDERATUM_COLORS = {"positional": "#1f77b4", "object_value": "#d62728", "box_label_value": "#2ca02c"}


def figure2(frame: pd.DataFrame):
    """Figure 2: per group of the base circuit, grouped bars (one per desideratum) over the
    models, accuracy (% of the desideratum's target) with the resampling std as error bars."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = frame[(frame.circuit == "base_circuit") & frame.desideratum.isin(desiderata.MAIN)]
    groups = list(dict.fromkeys(rows.group))
    models = list(dict.fromkeys(rows.model))
    fig = make_subplots(
        rows=1, cols=max(len(groups), 1), shared_yaxes=True,
        subplot_titles=[figures.GROUP_TITLES.get(g, g) for g in groups],
    )
    for col, group in enumerate(groups, start=1):
        for desideratum in desiderata.MAIN:
            sel = rows[(rows.group == group) & (rows.desideratum == desideratum)].set_index("model").reindex(models)
            fig.add_trace(
                go.Bar(
                    x=models, y=sel.accuracy_mean, error_y=dict(type="data", array=sel.accuracy_std),
                    name=desideratum.replace("_", " "), legendgroup=desideratum, showlegend=col == 1,
                    marker_color=DESIDERATUM_COLORS[desideratum],
                    customdata=sel[["n_selected", "group_size"]].to_numpy(),
                    hovertemplate="%{x}: %{y:.1f}% (%{customdata[0]} of %{customdata[1]} heads)<extra></extra>",
                ),
                row=1, col=col,
            )
    base = rows.circuit_of.iloc[0] if len(rows) else ""
    fig.update_layout(
        title=f"DCM on the {base} circuit: accuracy when the selected heads are patched (mean ± std over resamplings)",
        barmode="group", height=420, width=max(900, 330 * len(groups)), template="plotly_white",
    )
    fig.update_yaxes(range=[0, 100])
    fig.update_yaxes(title_text="accuracy (% of target)", row=1, col=1)
    return fig


def extra_figure(frame: pd.DataFrame):
    """Group B of the base circuit on every desideratum (main and extra; controls last)."""
    import plotly.graph_objects as go

    rows = frame[(frame.circuit == "base_circuit") & (frame.group == EXTRA_GROUP)]
    order = [d for d in desiderata.ALL if d not in desiderata.CONTROLS] + list(desiderata.CONTROLS)
    names = [d for d in order if d in set(rows.desideratum)]
    fig = go.Figure()
    for model in dict.fromkeys(rows.model):
        sel = rows[rows.model == model].set_index("desideratum").reindex(names)
        fig.add_trace(go.Bar(
            x=[n.replace("_", " ") for n in names], y=sel.accuracy_mean,
            error_y=dict(type="data", array=sel.accuracy_std), name=model,
        ))
    fig.update_layout(
        title="Group B (position transmitter) on every desideratum (controls: is not in, wrong segment)",
        barmode="group", height=450, width=1100, template="plotly_white",
        yaxis=dict(range=[0, 100], title="accuracy (% of target)"),
    )
    return fig


def cmd_dcm_figure(args: argparse.Namespace) -> None:
    names = [result_name(m) for m in args.models]
    results = {n: _read_dcm(args.results / n / "dcm.json") for n in names}
    base = result_name(args.base)
    for n, result in results.items():
        if result.get("base") != base:
            raise CircuitError(
                f"{args.results / n / 'dcm.json'} was computed on {result.get('base')}'s circuit, not {base}'s; "
                f"rerun `python -m et_circuits dcm --model {n} --base {args.base}`"
            )
    frame = pd.DataFrame([row for n in names for row in dcm_rows(n, results[n])])
    if frame.empty:
        raise CircuitError("the dcm.json files hold no results")
    write_csv(args.results / "dcm.csv", frame)
    todo = [("dcm", figure2(frame))]
    if (frame.desideratum.isin(desiderata.EXTRA) & (frame.circuit == "base_circuit")).any():
        todo.append(("dcm_extra", extra_figure(frame)))
    figures.save_figures(todo, args.figures)
    main = frame[(frame.circuit == "base_circuit") & frame.desideratum.isin(desiderata.MAIN)]
    for (model, letter), rows in main.groupby(["model", "letter"], sort=False):
        print(f"figure 2 {model} {letter}: " + " ".join(
            f"{r.desideratum}={r.accuracy_mean:.1f}±{r.accuracy_std:.1f}%" for r in rows.itertuples()
        ))


# ---------------------------------------------------------------------------------------------


def register(sub) -> None:
    p = sub.add_parser("dcm", help="DCM masks of one model on the base circuit's and its own circuit's groups")
    p.add_argument("--model", required=True)
    p.add_argument("--base", required=True, help="the model whose circuit Figure 2 uses")
    p.add_argument("--seeds", type=positive, default=3, help="mask trainings per group and desideratum")
    p.add_argument("--n-train", type=positive, default=desiderata.SPLIT_SIZES[0])
    p.add_argument("--n-eval", type=positive, default=desiderata.SPLIT_SIZES[1])
    p.add_argument("--n-test", type=positive, default=desiderata.SPLIT_SIZES[2])
    p.add_argument("--epochs", type=positive, default=2)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--lam", type=non_negative_float, default=0.01, help="sparsity weight lambda")
    p.add_argument("--boxes", type=boxes, default=7)
    p.add_argument("--resamples", type=positive, default=10, help="bootstrap resamplings of the test pairs")
    p.add_argument("--extra", choices=("base", "all", "none"), default="base",
                   help="models that also run the eleven extra desiderata on group B: the base model "
                   "only (default), every model, or none")
    p.add_argument("--own", choices=("cmap", "all"), default="cmap",
                   help="on the model's own circuit, only what CMAP patches (A: object value, B and C: "
                   "positional; default) or every group on the three main desiderata")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    model_args(p)
    results_arg(p)
    p.set_defaults(func=cmd_dcm)

    p = sub.add_parser("dcm-figure", help="Figure 2 and RESULTS/dcm.csv from every model's dcm.json")
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="+", required=True)
    results_arg(p)
    figures_arg(p)
    p.set_defaults(func=cmd_dcm_figure)
