"""Path patching at LLaMA-7B geometry: a randomly initialised 32-layer, 32-head, d_model 4096
HookedTransformer (bf16 on a GPU), 300 prompts, the full four-step sweep with the fast method;
the reference method is timed on a few senders per step and extrapolated to all 1024, and its
scores on those senders are compared with the fast ones. Goal: the full fast sweep in at most
5 minutes on one H200.

    python benchmarks/bench_7b_geometry.py                 # GPU, 7B geometry, bf16
    python benchmarks/bench_7b_geometry.py --small         # CPU, reduced geometry (tests run this)

Prompts use the organism's word-level tokenizer (its ids fit the 32000-token vocabulary); the
weights are random, so only the timing and the agreement of the two methods mean anything.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from et_circuits import models  # noqa: E402
from et_circuits import path_patching as pp  # noqa: E402
from et_circuits.entity_tracking import data, recipe  # noqa: E402
from et_circuits.settings import RunSettings  # noqa: E402
from et_circuits.organism.tokenizer import build_tokenizer  # noqa: E402

GEOMETRY_7B = dict(n_layers=32, n_heads=32, d_model=4096, d_mlp=11008, vocab=32000)
GEOMETRY_SMALL = dict(n_layers=4, n_heads=8, d_model=128, d_mlp=256, vocab=32000)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="reduced geometry on CPU (fp32) to test this script")
    p.add_argument("--n", type=int, default=None, help="prompts (default 300; 16 with --small)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bfloat16 (float32 with --small)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per plain forward")
    p.add_argument("--max-rows", type=int, default=4096, help="(sender, prompt) rows per fast pass")
    p.add_argument("--reference-senders", type=int, default=4, help="senders per step the reference is timed on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    geometry = GEOMETRY_SMALL if args.small else GEOMETRY_7B
    device = args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = DTYPES[args.dtype or ("float32" if args.small else "bfloat16")]
    n = args.n or (16 if args.small else 300)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = random_llama(**geometry, device=device, dtype=dtype)
    tok = build_tokenizer()
    vocab = data.vocabulary(tok, min_objects=7, min_labels=8)
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, n, 7, args.seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    print(
        f"geometry {n_layers} layers x {n_heads} heads, d_model {model.cfg.d_model}, {dtype}, {device}; "
        f"{n} prompts of {clean.input_ids.shape[1]} tokens; model built in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    top_k = pp.effective_top_k(recipe.PAPER_TOP_K, n_layers, n_heads)
    fast_settings = RunSettings(args.batch_size, args.max_rows, progress=True)
    ref_settings = RunSettings(args.batch_size, progress=False)
    rng = random.Random(args.seed)
    all_heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]

    sync(device)
    t0 = time.perf_counter()
    runs = pp.prepare(model, clean, corrupt, [s.position for s in pp.PAPER_STEPS], fast_settings)
    sync(device)
    fast_total = time.perf_counter() - t0
    print(f"  clean and corrupt runs: {fast_total:.1f}s", flush=True)
    reference_total, worst, previous = 0.0, 0.0, []
    for step, k in zip(pp.PAPER_STEPS, top_k):
        receivers = pp.step_receivers(step, previous) or None
        sync(device)
        t0 = time.perf_counter()
        fast = pp.path_patch(model, clean, corrupt, step.position, receivers, settings=fast_settings, runs=runs)
        sync(device)
        t_fast = time.perf_counter() - t0
        fast_total += t_fast

        # reference: its per-chunk clean and corrupt runs once, plus two passes per sender
        senders = rng.sample(all_heads, min(args.reference_senders, len(all_heads)))
        timings = []
        for subset in ([], senders):
            t0 = time.perf_counter()
            ref = pp.path_patch(
                model, clean, corrupt, step.position, receivers, senders=subset, method="reference", settings=ref_settings
            )
            sync(device)
            timings.append(time.perf_counter() - t0)
        fixed, with_senders = timings
        t_ref = fixed + (with_senders - fixed) * len(all_heads) / len(senders)
        reference_total += t_ref
        rows, cols = zip(*senders)
        diff = (fast[list(rows), list(cols)] - ref[list(rows), list(cols)]).abs().max().item()
        worst = max(worst, diff)
        print(
            f"  step {step.group:16s} fast {t_fast:8.1f}s | reference {t_ref:9.1f}s (extrapolated from "
            f"{len(senders)} senders) | max |fast - reference| on those {diff:.2e}",
            flush=True,
        )
        previous = pp.top_heads(fast, k)
    result = {"fast_s": fast_total, "reference_s": reference_total, "max_diff": worst}
    print(
        f"7b_geometry full_sweep_fast={fast_total:.1f}s reference_extrapolated={reference_total:.1f}s "
        f"speedup={reference_total / fast_total:.1f} max_diff={worst:.2e}"
    )
    return result


if __name__ == "__main__":
    main()
