"""Path patching at LLaMA-7B head geometry with paper-like receivers: a randomly initialised
32-layer, 32-head HookedTransformer, the paper's four steps with the fast method, and the
reference method timed on senders spread over the layers and extrapolated to all of them.

The receivers of steps B-D are placed as in the paper, not taken from what random weights
rank first (with random weights the top heads of a step can sit in layer 0, leaving the next
step nothing to reach): group A's 20 heads, B's 5 and C's 10 at layers drawn around the
paper's exemplar heads (A L21, B L14, C L10; D L8 is a sender), scaled to the model's depth.

    python benchmarks/bench_7b_geometry.py                     # GPU: d_model 4096, bf16, 300 prompts
    python benchmarks/bench_7b_geometry.py --cpu               # CPU: d_model 512, fp32, 8 prompts
    python benchmarks/bench_7b_geometry.py --small             # 4 layers x 8 heads (the tests run this)

Per step it prints both methods' time and their cost in plain forwards (one plain forward pass
over all prompts), and the ratio's range over three disjoint reference sender samples; the
last line is `7b_geometry speedup=<median> ...`. The first run also times a position sweep over
every token, with head sweeps at its strongest position only (`mark=1`): random weights mark a
third of the positions, and their head sweeps would take hours on CPU while measuring nothing
new (each costs about L*H/2 x its share of the prompt). Prompts use the organism's word-level
tokenizer (its ids fit LLaMA's 32000-token vocabulary too); only the timing and the agreement
of the two methods mean anything.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from et_circuits import models
from et_circuits.core.forward import last_logits  # noqa: E402
from et_circuits.core.settings import RunSettings  # noqa: E402
from et_circuits.methods import discovery  # noqa: E402
from et_circuits.methods import path_patching as pp  # noqa: E402
from et_circuits.methods.sweep import sweep  # noqa: E402
from et_circuits.tasks.entity_tracking import data, recipe  # noqa: E402
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer  # noqa: E402
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS

# The CPU geometries keep LLaMA-7B's heads (what path patching's cost depends on) with a
# narrow residual stream and the organism's vocabulary, so that a plain forward takes well
# under a second on 2 cores.
GEOMETRIES = {
    "7b": dict(n_layers=32, n_heads=32, d_model=4096, d_mlp=11008, vocab=32000),
    "cpu": dict(n_layers=32, n_heads=32, d_model=512, d_mlp=1376, vocab=None),
    "small": dict(n_layers=4, n_heads=8, d_model=128, d_mlp=256, vocab=None),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PAPER_LAYERS = 32
# Group sizes of the paper's Llama-7B circuit that steps B-D receive from, and the layer of the
# paper's exemplar head of each group (Section 3).
RECEIVER_GROUPS = {
    "pos_transmitter": ("value_fetcher", 20, 21),
    "pos_detector": ("pos_transmitter", 5, 14),
    "struct_reader": ("pos_detector", 10, 10),
}
SAMPLES = 3  # disjoint reference sender samples per step


def random_llama(n_layers, n_heads, d_model, d_mlp, vocab, device, dtype):
    """A randomly initialised LLaMA-shaped HookedTransformer, built directly on `device`
    through the project's own config conversion (models.hooked_config)."""
    from transformer_lens import HookedTransformer
    from transformers import LlamaConfig

    hf_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    )
    cfg = models.hooked_config(hf_config, device, dtype)
    with torch.device(device):
        model = HookedTransformer(cfg, move_to_device=False)
    return model.to(device).eval()


def paper_like_receivers(n_layers: int, n_heads: int, rng: random.Random) -> dict[str, list[tuple[int, int]]]:
    """Per step B-D, the previous group's heads: the paper's group size (capped to a quarter of
    the model), at layers within +-2 (scaled) of the paper's exemplar layer."""
    out = {}
    for step, (_, size, layer) in RECEIVER_GROUPS.items():
        centre = round(layer * n_layers / PAPER_LAYERS)
        spread = max(1, round(2 * n_layers / PAPER_LAYERS))
        layers = [l for l in range(centre - spread, centre + spread + 1) if 0 < l < n_layers]
        pool = [(l, h) for l in layers for h in range(n_heads)]
        out[step] = sorted(rng.sample(pool, min(size, len(pool), n_layers * n_heads // 4)))
    return out


def sender_samples(n_layers: int, n_heads: int, per_sample: int, rng: random.Random) -> list[list[tuple[int, int]]]:
    """`SAMPLES` disjoint sets of senders, each with the same number from every layer (about
    `per_sample` in all)."""
    per_layer = max(1, min(per_sample // n_layers, n_heads // SAMPLES))
    heads = [rng.sample(range(n_heads), n_heads) for _ in range(n_layers)]
    return [
        [(layer, h) for layer in range(n_layers) for h in heads[layer][s * per_layer : (s + 1) * per_layer]]
        for s in range(SAMPLES)
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(fn(), seconds), with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="7B head geometry at d_model 512 on CPU (fp32, 8 prompts)")
    p.add_argument("--small", action="store_true", help="4 layers x 8 heads on CPU, to test this script")
    p.add_argument("--n", type=int, default=None, help="prompts (default 300 on a GPU, 8 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per plain forward")
    p.add_argument("--max-rows", type=int, default=4096, help="(sender, prompt) rows per fast pass")
    p.add_argument("--reference-senders", type=int, default=32, help="senders per sample the reference is timed on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=1, help="whole runs (seeds seed, seed+1, ...); the median ratio counts")
    args = p.parse_args(argv)
    results = [run(args, args.seed + i, with_sweep=i == 0) for i in range(args.runs)]
    if args.runs == 1:
        return results[0]
    speedups = sorted(r["speedup"] for r in results)
    median = statistics.median(speedups)
    each = ", ".join(f"{s:.1f}" for s in speedups)
    print(
        f"7b_geometry speedup median of {args.runs} runs={median:.1f} (runs: {each}; "
        f"max_diff {max(r['max_diff'] for r in results):.2e})"
    )
    return {**results[0], "speedup": median, "runs": results}


def run(args: argparse.Namespace, seed: int, with_sweep: bool = True) -> dict:
    """One whole run: a model, prompts, receivers and reference senders drawn from `seed`; the
    position sweep too when `with_sweep`."""
    on_cpu = args.cpu or args.small
    geometry = GEOMETRIES["small" if args.small else "cpu" if args.cpu else "7b"]
    device = args.device or ("cpu" if on_cpu or not torch.cuda.is_available() else "cuda")
    dtype = DTYPES[args.dtype or ("float32" if on_cpu else "bfloat16")]
    n = args.n or (8 if on_cpu else 300)

    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    model = random_llama(**{**geometry, "vocab": geometry["vocab"] or len(tok)}, device=device, dtype=dtype)
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_objects=7, min_labels=8), n, 7, seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    print(
        f"geometry {n_layers} layers x {n_heads} heads, d_model {model.cfg.d_model}, {dtype}, {device}; "
        f"{n} prompts of {clean.seq_len} tokens; model built in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    fast_settings = RunSettings(args.batch_size, args.max_rows, progress=False)
    ref_settings = RunSettings(args.batch_size, progress=False)
    forward = min(timed(lambda: last_logits(model, clean, settings=ref_settings), device)[1] for _ in range(3))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    receivers_of = paper_like_receivers(n_layers, n_heads, rng)
    samples = sender_samples(n_layers, n_heads, args.reference_senders, rng)

    positions = [s.position for s in PAPER_STEPS]
    runs, fast_total = timed(lambda: pp.prepare_runs(model, clean, corrupt, positions, fast_settings), device)
    print(
        f"  one plain forward {forward:.2f}s; clean and corrupt runs {fast_total:.1f}s "
        f"({fast_total / forward:.1f} forwards)"
    )
    reference_totals, worst = [0.0] * SAMPLES, 0.0
    largest = {}
    for step in PAPER_STEPS:
        receivers = discovery.step_receivers(step, receivers_of.get(step.group, [])) or None
        patch = partial(pp.path_patch, model, clean, corrupt, step.position, receivers=receivers)
        fast, t_fast = timed(partial(patch, settings=fast_settings, runs=runs), device)
        fast = fast.scores
        fast_total += t_fast
        reference = partial(patch, method="reference", settings=ref_settings)
        _, fixed = timed(partial(reference, senders=[]), device)
        extrapolated = []
        for i, senders in enumerate(samples):
            ref, t = timed(partial(reference, senders=senders), device)
            ref = ref.scores
            full = fixed + (t - fixed) * n_layers * n_heads / len(senders)
            extrapolated.append(full)
            reference_totals[i] += full
            rows, cols = zip(*senders)
            worst = max(worst, (fast[list(rows), list(cols)] - ref[list(rows), list(cols)]).abs().max().item())
        largest[step.group] = fast.abs().max().item()
        median = statistics.median(extrapolated)
        print(
            f"  step {step.group:16s} fast {t_fast:8.1f}s ({t_fast / forward:7.1f} fwd) | reference {median:9.1f}s "
            f"({median / forward:8.1f} fwd; extrapolated from {SAMPLES} x {len(samples[0])} senders, "
            f"range {min(extrapolated):.1f}-{max(extrapolated):.1f}s) | max |score| {largest[step.group]:.2e}",
            flush=True,
        )
    # The position sweep over every token (the discovered reading's first step), same prompts;
    # head sweeps at the strongest position only.
    t_sweep = float("nan")
    if with_sweep:
        found, t_sweep = timed(lambda: sweep(model, clean, corrupt, None, mark=1.0, settings=fast_settings), device)
        print(
            f"  position sweep over all {clean.seq_len} positions x {n_layers} layers, then both head sweeps at "
            f"{len(found.heads)} position{'s' * (len(found.heads) != 1)}: {t_sweep:.1f}s "
            f"({t_sweep / forward:.1f} fwd; "
            f"{t_sweep / fast_total:.2f} of the four-step fast sweep)",
            flush=True,
        )
    ratios = sorted(r / fast_total for r in reference_totals)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    result = {
        "fast_s": fast_total,
        "reference_s": statistics.median(reference_totals),
        "speedup": statistics.median(ratios),
        "speedup_range": (ratios[0], ratios[-1]),
        "max_diff": worst,
        "largest": largest,
        "forward_s": forward,
        "peak_gib": peak,
        "sweep_s": t_sweep,
        "sweep_share": t_sweep / fast_total,
    }
    print(
        f"7b_geometry speedup={result['speedup']:.1f} (range {ratios[0]:.1f}-{ratios[-1]:.1f} over the reference "
        f"samples) full_sweep_fast={fast_total:.1f}s ({fast_total / forward:.1f} forwards) "
        f"reference_extrapolated={result['reference_s']:.1f}s "
        f"max_diff={worst:.2e}" + (f" peak_gpu={peak:.1f}GiB" if device.startswith("cuda") else "")
    )
    return result


if __name__ == "__main__":
    main()
