"""Stage `cmap` (Figure 3: fine-tuned -> base activation patching). It reads each fine-tuned
model's circuit.json and dcm.json and writes cmap.csv (one row per pair x head set x patch kind,
both baselines on each row) and, under --figures (default figures/), the `cmap` figure (Figure
3, output patching) and `cmap_input` (input patching), per reading; names from `results`.
"""

from __future__ import annotations

import argparse
import gc

import pandas as pd

from et_circuits import presentation as figures
from et_circuits.core.errors import CircuitError
from et_circuits.core.io import write_csv
from et_circuits.methods.cmap import INPUT_PATCHES, cmap, input_patches_for
from et_circuits.models import result_name
from et_circuits.tasks.entity_tracking import recipe

from .. import results
from ..results import SECTIONS_OF, check_dcm_matches, read_dcm, readings_in, selected_heads
from ..running import load_model, per_model, settings


def cmd_cmap(args: argparse.Namespace) -> None:
    sources = [m for m in args.models if m != args.base]
    if not sources:
        raise CircuitError("cmap needs at least one fine-tuned model besides the base")
    inputs = {}
    for name in sources:  # read every input before loading any model
        result = read_dcm(args.results / result_name(name) / results.DCM)
        for reading in readings_in(result):
            section = SECTIONS_OF[reading][1]
            circuit = results.load_circuit(args.results, result_name(name), reading)
            check_dcm_matches(circuit, result, section)
            inputs[(name, reading)] = recipe.cmap_head_sets(circuit, selected_heads(result, section))
    base, tokenizer, _ = load_model(args.base, args)
    base_name = result_name(args.base)
    prompts = recipe.prompts_for("cmap", tokenizer, args.n, args.boxes, args.seed)
    patches = input_patches_for(base)
    if args.input_sets and patches != INPUT_PATCHES:
        print(f"cmap: {base_name} shares key/value heads (grouped-query attention): input patching of q only")
    units = [(name, reading) for name in sources for reading in SECTIONS_OF if (name, reading) in inputs]
    variant_lists = [
        recipe.variants(
            inputs[unit], input_sets=[s for s in args.input_sets if s in inputs[unit]], input_patches=patches
        )
        for unit in units
    ]
    loaded: dict[str, object] = {}  # the source model of the last unit (a rank's units come in order)

    def rows_of(i: int) -> list[dict]:
        name, reading = units[i]
        if name not in loaded:
            loaded.clear()
            gc.collect()
            loaded[name] = load_model(name, args, args.source_device)[0]
        result = cmap(base, loaded[name], prompts, variant_lists[i], settings=settings(args))
        print(
            f"cmap {result_name(name)} -> {base_name} ({reading} positions): base={result.base:.2f} "
            f"fine-tuned={result.source:.2f} " + " ".join(f"{v.name}/{v.patch}={acc:.2f}" for v, acc in result.variants)
        )
        return results.cmap_rows(result, result_name(name), base_name, reading)

    # under torchrun: each (model, reading) on one rank, balanced by its number of variants
    found = per_model(rows_of, range(len(units)), [len(v) for v in variant_lists])
    loaded.clear()
    rows = [row for part in found for row in part]
    frame = pd.DataFrame(rows)
    write_csv(args.results / results.CMAP_CSV, frame)
    todo = []
    for reading in frame["positions"].unique():
        part = frame[frame["positions"] == reading]
        todo.append((results.stage_stem("cmap", reading), figures.cmap_figure(part)))
        if args.input_sets:
            todo.append((results.stage_stem(results.CMAP_INPUT_FIGURE, reading), figures.input_patching_figure(part)))
    figures.save_figures(todo, args.figures)
