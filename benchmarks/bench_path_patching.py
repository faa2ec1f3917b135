"""Reference vs fast path patching, all four steps in the same run, on one model (default
organism-llama). Both methods get the same receivers (the fast run's top-k of each step), the
scores are compared, and the last line is `path_patching speedup=<reference / fast wall time>`.

    python benchmarks/bench_path_patching.py [--model organism-llama] [--n 300] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from et_circuits import models
from et_circuits.core.errors import SetupError  # noqa: E402
from et_circuits.core.forward import last_logits  # noqa: E402
from et_circuits.core.settings import RunSettings  # noqa: E402
from et_circuits.methods import discovery  # noqa: E402
from et_circuits.methods import path_patching as pp  # noqa: E402
from et_circuits.methods.sweep import sweep  # noqa: E402
from et_circuits.tasks.entity_tracking import data, paper, recipe  # noqa: E402
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism-llama", help="registry name or HF checkpoint directory")
    p.add_argument("--n", type=int, default=300, help="prompts (paper: 300)")
    p.add_argument("--boxes", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward (both methods)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        model, tok, spec = models.load(args.model, device=args.device)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    vocab = data.vocabulary(tok, min_objects=args.boxes, min_labels=args.boxes + 1)
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, args.n, args.boxes, args.seed)
    top_k = discovery.effective_top_k(recipe.PAPER_TOP_K, model.cfg.n_layers, model.cfg.n_heads, paper.TOP_K_CAP)
    quiet = RunSettings(args.batch_size, progress=False)
    print(
        f"{spec.name}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}, "
        f"{args.n} prompts of {clean.input_ids.shape[1]} tokens, batch {args.batch_size}, "
        f"top-k {list(top_k)}, device {model.cfg.device}, threads {torch.get_num_threads()}"
    )
    # The unit both methods are made of: one plain forward over all prompts (best of three).
    forward = min(timed(lambda: last_logits(model, clean, settings=quiet))[1] for _ in range(3))
    print(f"  one plain forward over the {args.n} prompts: {forward:.2f}s")
    runs, seconds = timed(lambda: pp.prepare_runs(model, clean, corrupt, [s.position for s in PAPER_STEPS], quiet))
    print(f"  fast: clean and corrupt runs (shared by the steps) {seconds:8.2f}s")
    prepared = seconds
    previous: list = []
    total = {"fast": seconds, "reference": 0.0}
    worst = 0.0
    for step, k in zip(PAPER_STEPS, top_k):
        receivers = discovery.step_receivers(step, previous) or None
        scores = {}
        for method in ("fast", "reference"):
            result, seconds = timed(
                partial(
                    pp.path_patch,
                    model,
                    clean,
                    corrupt,
                    step.position,
                    receivers=receivers,
                    method=method,
                    settings=quiet,
                    runs=runs if method == "fast" else None,
                )
            )
            scores[method] = result.scores
            total[method] += seconds
            print(f"  step {step.group:16s} {method:9s} {seconds:8.2f}s", flush=True)
        diff = (scores["fast"] - scores["reference"]).abs().max().item()
        worst = max(worst, diff)
        largest = scores["reference"].abs().max().item()
        print(f"  step {step.group:16s} max |fast - reference| = {diff:.2e} (max |score| {largest:.2e})")
        previous = pp.top_heads(scores["fast"], k)
    speedup = total["reference"] / total["fast"]
    print(f"reference {total['reference']:.2f}s, fast {total['fast']:.2f}s, max score difference {worst:.2e}")
    print(
        f"in plain forwards: reference {total['reference'] / forward:.1f}, fast {total['fast'] / forward:.1f} "
        f"(clean and corrupt runs {prepared / forward:.1f})"
    )
    # The position sweep of the discovered reading (recipe.SWEEP_POSITIONS), on the same prompts.
    found, seconds = timed(lambda: sweep(model, clean, corrupt, recipe.SWEEP_POSITIONS, settings=quiet))
    print(
        f"position sweep: {len(found.positions)} positions x {model.cfg.n_layers} layers, heads at "
        f"{len(found.marked)} marked positions: {seconds:.2f}s ({seconds / forward:.1f} plain forwards; "
        f"{seconds / total['fast']:.2f} of the fast four-step sweep)"
    )
    print(f"path_patching speedup={speedup:.1f}")
    return speedup


if __name__ == "__main__":
    main()
