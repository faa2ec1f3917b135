"""Stage `circuit`: the paper's circuit discovery for each model, in both readings (the paper's
positions and the discovered ones), written under RESULTS/<model>/ (`results` names the files:
step scores reused when their key matches, circuit.json, minimality.json, completeness.json,
and the discovered reading's sweep.json)."""

from __future__ import annotations

import argparse
import gc
import time

from et_circuits.core.digest import weights_digest
from et_circuits.models import result_name
from et_circuits.tasks.entity_tracking import recipe
from et_circuits.tasks.entity_tracking.paper import letter

from .. import results
from ..running import load_model, per_model, settings


def cmd_circuit(args: argparse.Namespace) -> None:
    per_model(lambda m: circuit_of(m, args), args.models)  # one process for several models, each loaded once


def plan_of(args: argparse.Namespace) -> recipe.CircuitPlan:
    """The discovery settings of the command line."""
    return recipe.CircuitPlan(
        n=args.n,
        n_boxes=args.boxes,
        seed=args.seed,
        top_k=tuple(args.top_k),
        top_k_cap=args.top_k_cap,
        method=args.method,
        screen=args.screen,
        ig_steps=args.ig_steps,
        minimality_n=args.minimality_n,
        minimality_threshold=args.minimality_threshold,
        reference_n=args.reference_n,
        completeness_random=args.completeness_random,
        sweep_n=args.sweep_n,
        mark=args.mark,
    )


def circuit_of(model_arg: str, args: argparse.Namespace) -> None:
    """Both readings of one model's circuit, written under RESULTS/<model>/."""
    name = result_name(model_arg)
    model, tokenizer, _ = load_model(model_arg, args)
    plan = plan_of(args)
    key = {
        "model": name,
        "weights": weights_digest(model),  # the weights and dtype (a sample of each tensor)
        "seed": str(args.seed),
        "n": str(args.n),
        "boxes": str(args.boxes),
        "dtype": args.dtype,
    }
    for reading in recipe.READINGS:
        out = results.reading_dir(args.results, name, reading)
        screen = None if args.screen is None else (args.screen, args.ig_steps)
        finished, on_step = results.step_files(out / results.STEPS_DIR, key, args.method, screen)
        t0 = time.perf_counter()
        found = recipe.discover(
            model,
            tokenizer,
            reading,
            plan,
            settings=settings(args),
            finished=finished,
            on_step=on_step,
            means_cache=args.results / name,
        )
        results.write_discovery(out, found, plan)
        screened = f", screened N={args.screen}" if args.screen is not None else ""
        sizes = " ".join(
            f"{letter(g)}={len(found.circuit.groups[g])}/{len(found.candidates.groups[g])}"
            for g in found.circuit.groups
        )
        print(
            f"{name} ({reading} positions{screened}): circuit {sizes} (kept/top-k) | {time.perf_counter() - t0:.1f}s "
            f"-> {out / results.CIRCUIT}"
        )
    del model
    gc.collect()
