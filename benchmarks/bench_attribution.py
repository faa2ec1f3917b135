"""Attribution against exact path patching: what screening costs and what it finds.

At LLaMA-7B head geometry (a random 32-layer, 32-head model, as `bench_7b_geometry.py` builds
it, with its paper-like receivers for steps B-D), per step of the paper's four:

- exact fast path patching of every sender: time and cost in plain forwards;
- attribution (`path_patch(method="attribution")`) of every sender;
- screened: attribution, then exact fast path patching of the N = 2 x top-k senders with the
  largest |attribution| only, the group chosen from those exact scores;
- Spearman correlation of attribution with the exact scores over all senders, and top-k recall
  (the share of the exact group the screened step chooses).

The shared clean and corrupt runs (`prepare_runs`) count once, in both totals. Then the
attribution position sweep over every token (before its exact confirmation), in plain forwards.
On the organism's four models it checks, per step, that screened discovery (N = 2 x top-k)
chooses the exact groups, with the same Spearman and recall.

    python benchmarks/bench_attribution.py             # CPU: d_model 512, fp32, 8 prompts
    python benchmarks/bench_attribution.py --small     # 4 layers x 8 heads (the tests run this)
    python benchmarks/bench_attribution.py --gpu       # d_model 4096, bf16, 300 prompts

The last two lines are `7b_geometry screened: forwards=<x> exact_forwards=<y> ratio=<y/x>
recall=<r>` and `sweep_attribution forwards=<x>`. Random weights rank differently from trained
ones: the recall printed is what it is, untuned.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_7b_geometry import DTYPES, GEOMETRIES, paper_like_receivers, random_llama, sync  # noqa: E402

from et_circuits import models  # noqa: E402
from et_circuits.core.agreement import spearman, top_k_recall  # noqa: E402
from et_circuits.core.forward import last_logits  # noqa: E402
from et_circuits.core.metrics import answer_prob  # noqa: E402
from et_circuits.core.settings import RunSettings  # noqa: E402
from et_circuits.methods import discovery  # noqa: E402
from et_circuits.methods import path_patching as pp  # noqa: E402
from et_circuits.methods.attribution import sweep_attribution  # noqa: E402
from et_circuits.methods.sweep import absolute_positions  # noqa: E402
from et_circuits.tasks.entity_tracking import data, recipe  # noqa: E402
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer  # noqa: E402
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS, PAPER_TOP_K, TOP_K_CAP  # noqa: E402

ORGANISM = ["organism-llama", "organism-vicuna", "organism-goat", "organism-float"]


def timed(fn, device: str):
    """(fn(), seconds): wall time on a GPU; on the CPU this process's CPU time on one thread, so
    that other processes on a shared machine do not change the ratios."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    sync(device)
    t0 = clock()
    out = fn()
    sync(device)
    return out, clock() - t0


def compare_steps(model, clean, corrupt, receivers_of, top_k, runs, settings, forward) -> tuple[float, float, int, int]:
    """Per paper step, with the receivers `receivers_of[group]` (through the step's inputs): exact
    fast path patching, attribution, and screened (attribution, then exact for N = 2 x top-k),
    each step's line printed. Returns the exact and screened seconds (without the shared runs)
    and how many heads of the exact groups the screened steps chose, of how many."""
    n_layers, n_heads, device = model.cfg.n_layers, model.cfg.n_heads, str(model.cfg.device)
    exact_s, screened_s, hits, wanted = 0.0, 0.0, 0, 0
    for step, k in zip(PAPER_STEPS, top_k):
        receivers = discovery.step_receivers(step, receivers_of.get(step.group, [])) or None
        if step.receiver_kind is not None and not receivers:
            continue  # nothing to receive (an empty group before): no sender is scored
        among = discovery.reachable(receivers or [], n_layers, n_heads)
        patch = partial(pp.path_patch, model, clean, corrupt, step.position, receivers=receivers, runs=runs)
        exact, t_exact = timed(partial(patch, settings=settings), device)
        estimate, t_attr = timed(partial(patch, method="attribution", settings=settings), device)
        screen = discovery.screened_senders(estimate, 2 * k, among)
        checked, t_check = timed(partial(patch, senders=screen, settings=settings), device)
        group, chosen = set(exact.top(k, among=among)), set(checked.top(k, among=among))
        hits, wanted = hits + len(group & chosen), wanted + len(group)
        exact_s, screened_s = exact_s + t_exact, screened_s + t_attr + t_check
        rho = spearman(estimate.scores, exact.scores)
        recall = top_k_recall(estimate.scores, exact.scores, k, 2 * k)
        print(
            f"  step {step.group:16s} exact {t_exact:7.2f}s ({t_exact / forward:6.1f} fwd) | attribution "
            f"{t_attr:6.2f}s ({t_attr / forward:5.1f} fwd) | screened N={2 * k} "
            f"{t_attr + t_check:6.2f}s ({(t_attr + t_check) / forward:5.1f} fwd) | spearman {rho:+.2f} | "
            f"top-{k} recall in top-{2 * k} {recall:.2f} | group found {len(group & chosen)}/{len(group)}",
            flush=True,
        )
    return exact_s, screened_s, hits, wanted


def geometry(args: argparse.Namespace) -> dict:
    """The screened four steps and the attribution sweep at 7B head geometry."""
    on_cpu = not args.gpu
    shape = GEOMETRIES["small" if args.small else "cpu" if on_cpu else "7b"]
    device = args.device or ("cuda" if args.gpu else "cpu")
    dtype = DTYPES[args.dtype or ("float32" if on_cpu else "bfloat16")]
    n = args.n or (8 if on_cpu else 300)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    model = random_llama(**{**shape, "vocab": shape["vocab"] or len(tok)}, device=device, dtype=dtype)
    vocab = data.vocabulary(tok, min_objects=7, min_labels=8)
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, n, 7, args.seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    settings = RunSettings(args.batch_size, args.max_rows, progress=False)
    forward = min(timed(lambda: last_logits(model, clean, settings=settings), device)[1] for _ in range(3))
    print(
        f"geometry {n_layers} layers x {n_heads} heads, d_model {model.cfg.d_model}, {dtype}, {device}; "
        f"{n} prompts of {clean.seq_len} tokens; one plain forward {forward:.2f}s",
        flush=True,
    )
    top_k = discovery.effective_top_k(PAPER_TOP_K, n_layers, n_heads, TOP_K_CAP)
    receivers_of = paper_like_receivers(n_layers, n_heads, rng)
    runs, shared = timed(
        lambda: pp.prepare_runs(model, clean, corrupt, [s.position for s in PAPER_STEPS], settings), device
    )
    receivers = {step.group: receivers_of.get(step.group, []) for step in PAPER_STEPS}
    exact_s, screened_s, hits, wanted = compare_steps(model, clean, corrupt, receivers, top_k, runs, settings, forward)
    exact_s, screened_s = exact_s + shared, screened_s + shared
    swept, names = absolute_positions(clean)
    corrupt_at = corrupt.replace(positions={p: swept.positions[p] for p in names})
    _, t_sweep = timed(
        lambda: sweep_attribution(model, swept, corrupt_at, names, answer_prob, settings.batch_size), device
    )
    result = {
        "forwards": screened_s / forward,
        "exact_forwards": exact_s / forward,
        "recall": hits / max(1, wanted),
        "sweep_forwards": t_sweep / forward,
        "positions": len(names),
    }
    result["ratio"] = result["exact_forwards"] / result["forwards"]
    print(f"  attribution sweep over all {len(names)} positions x {n_layers} layers x {n_heads} heads: {t_sweep:.1f}s")
    return result


def organism(args: argparse.Namespace) -> dict[str, bool]:
    """Per organism model: each step compared (`compare_steps`, receivers the exact discovery's
    groups) and whether screened discovery (N = 2 x top-k) chooses the exact groups."""
    same = {}
    for name in ORGANISM:
        model, tok, _ = models.load(name, device="cpu")
        top_k = discovery.effective_top_k(PAPER_TOP_K, model.cfg.n_layers, model.cfg.n_heads, TOP_K_CAP)
        clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), args.organism_n, 7, 0)
        settings = RunSettings(args.batch_size, args.max_rows, progress=False)
        plain = partial(last_logits, model, clean, settings=settings)
        forward = min(timed(plain, "cpu")[1] for _ in range(3))
        exact = discovery.find_circuit(model, clean, corrupt, top_k, PAPER_STEPS, settings=settings)
        screened = discovery.find_circuit(
            model, clean, corrupt, top_k, PAPER_STEPS, screen=2 * max(top_k), settings=settings
        )
        same[name] = screened.circuit == exact.circuit
        print(f"{name}: {args.organism_n} prompts, one plain forward {forward:.3f}s; screened = exact: {same[name]}")
        runs = pp.prepare_runs(model, clean, corrupt, [s.position for s in PAPER_STEPS], settings)
        groups = exact.circuit.groups
        receivers = {s.group: groups[p.group] for p, s in zip(PAPER_STEPS, PAPER_STEPS[1:])}
        compare_steps(model, clean, corrupt, receivers, top_k, runs, settings, forward)
    return same


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="4 layers x 8 heads on CPU, to test this script")
    p.add_argument("--gpu", action="store_true", help="d_model 4096, bf16, 300 prompts")
    p.add_argument("--n", type=int, default=None, help="prompts (default 300 on a GPU, 8 on CPU)")
    p.add_argument("--organism-n", type=int, default=300, help="organism prompts (the circuit stage's)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-rows", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    if not args.gpu:
        torch.set_num_threads(1)  # CPU time on one thread: the cost, whatever else runs
    try:
        same = organism(args)
        result = {**geometry(args), "organism_same": same}
    finally:
        torch.set_num_threads(threads)
    print(f"sweep_attribution forwards={result['sweep_forwards']:.1f}")
    print(
        f"7b_geometry screened: forwards={result['forwards']:.1f} exact_forwards={result['exact_forwards']:.1f} "
        f"ratio={result['ratio']:.1f} recall={result['recall']:.2f}"
    )
    return result


if __name__ == "__main__":
    main()
