"""Stages `cmap` (Figure 3: fine-tuned -> base activation patching) and `knockout` (attention
knockout curves).

`cmap` reads RESULTS/<ft>/circuit.json and RESULTS/<ft>/dcm.json for each fine-tuned model and
writes RESULTS/cmap.csv (one row per pair x head set x patch kind, both baselines on each row)
and, under --figures (default figures/), cmap.{html,png} (Figure 3, output patching) and
cmap_input.{html,png} (input patching). `knockout` writes RESULTS/knockout.csv and
knockout.{html,png}. Result directories and model columns use `stages.circuit.result_name`.
"""

from __future__ import annotations

import argparse
import gc

import pandas as pd

from .. import cmap, data, figures, knockout
from ..circuit import GROUP_LETTERS, Circuit, CircuitError
from ..cli import boxes, figures_arg, load_model, model_args, positive, results_arg
from ..io import read_json, write_csv
from .circuit import result_name

# Each stage draws its own prompts: seed + offset, so they are not the prompts of other stages.
CMAP_SEED_OFFSET = 5
KNOCKOUT_SEED_OFFSET = 6
SET_CHOICES = (*GROUP_LETTERS.values(), cmap.FULL)


def _prompts(tokenizer, args: argparse.Namespace, offset: int) -> data.Batch:
    vocab = data.vocabulary(tokenizer, min_objects=args.boxes, min_labels=args.boxes)
    return data.make_batch(tokenizer, data.sample_prompts(vocab, args.n, args.boxes, args.seed + offset))


def _read_dcm(path):
    if not path.exists():
        raise CircuitError(f"no DCM result at {path}; run `make dcm` (python -m et_circuits dcm) first")
    try:
        return read_json(path)
    except ValueError as e:
        raise CircuitError(f"{path} is not valid JSON: {e}") from None


def cmd_cmap(args: argparse.Namespace) -> None:
    sources = [m for m in args.models if m != args.base]
    if not sources:
        raise CircuitError("cmap needs at least one fine-tuned model besides the base")
    inputs = {}
    for name in sources:  # read every input before loading any model
        out = args.results / result_name(name)
        circuit = Circuit.load(out / "circuit.json")
        inputs[name] = cmap.cmap_head_sets(circuit, _read_dcm(out / "dcm.json")), circuit
    base, tokenizer, _ = load_model(args.base, args)
    base_name = result_name(args.base)
    batch = _prompts(tokenizer, args, CMAP_SEED_OFFSET)
    rows = []
    for name in sources:
        head_sets, circuit = inputs[name]
        source, _, _ = load_model(name, args)
        variant_list = cmap.variants(head_sets, input_sets=args.input_sets)
        result = cmap.cmap_accuracy(
            base, source, batch, variant_list, circuit.positions, batch_size=args.batch_size
        )
        rows += cmap.result_rows(result, result_name(name), base_name)
        print(f"cmap {result_name(name)} -> {base_name}: base={result.base:.2f} fine-tuned={result.source:.2f} "
              + " ".join(f"{v.set_name}/{v.patch}={acc:.2f}" for v, acc in result.variants))
        del source
        gc.collect()
    frame = pd.DataFrame(rows)
    write_csv(args.results / "cmap.csv", frame)
    todo = [("cmap", cmap.cmap_figure(frame))]
    if args.input_sets:
        todo.append(("cmap_input", cmap.input_patching_figure(frame)))
    figures.save_figures(todo, args.figures)


def cmd_knockout(args: argparse.Namespace) -> None:
    model, tokenizer, _ = load_model(args.model, args)
    name = result_name(args.model)
    batch = _prompts(tokenizer, args, KNOCKOUT_SEED_OFFSET)
    full, curves = knockout.knockout_accuracy(model, batch, seed=args.seed, batch_size=args.batch_size)
    frame = pd.DataFrame(knockout.result_rows(name, full, curves, len(batch)))
    write_csv(args.results / "knockout.csv", frame)
    figures.save_figures([("knockout", knockout.knockout_figure(frame))], args.figures)
    print(f"knockout {name}: full={full:.2f} "
          + " ".join(f"{e}=[{', '.join(f'{a:.2f}' for a in accs)}]" for e, accs in curves.items()))


def register(sub) -> None:
    p = sub.add_parser("cmap", help="Figure 3: patch fine-tuned heads into the base model")
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="+", required=True, help="fine-tuned models (the base is skipped)")
    p.add_argument("--n", type=positive, default=500)
    p.add_argument("--boxes", type=boxes, default=7)
    p.add_argument(
        "--input-sets", nargs="*", choices=SET_CHOICES, default=["A"],
        help="head sets also input-patched (q, k, v, qk, qkv); default A, as in the paper",
    )
    model_args(p)
    results_arg(p)
    figures_arg(p)
    p.set_defaults(func=cmd_cmap)

    p = sub.add_parser("knockout", help="attention knockout: accuracy vs first blocked layer")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=positive, default=500)
    p.add_argument("--boxes", type=boxes, default=7)
    model_args(p)
    results_arg(p)
    figures_arg(p)
    p.set_defaults(func=cmd_knockout)
