"""The first GPU run, prepared: one command that checks the CUDA path against the CPU on the model
organism and measures LLaMA-7B head geometry at full width, within a budget (default 480 s), and
writes every number to a JSON file after every part.

    make gpu-check                                            # = the line below, from the venv
    python benchmarks/gpu_check.py --device cuda --out benchmarks/results/
    python benchmarks/gpu_check.py --device cpu --small       # the CPU rehearsal: every part, small sizes

The parts, in order (each in its own time budget; `--parts` picks some, `--part-budget` sets one):

1. `environment`: device name and memory, torch / CUDA / cuDNN versions, bf16 support, the
   float32 matmul settings (TF32 would break the fp32 checks), package versions.
2. `correctness.*`: on the organism, each computed on the device and on the CPU and compared:
   `path_patching` (the fast method's scores of the paper's four steps, fp32, |diff| <= 1e-4),
   `table1` (mean-ablation accuracies, identical at 3 decimals), `dcm` (one training, fixed
   seed: the same selected heads), `cmap` (organism-goat -> organism-llama, within 0.01) and
   `attribution` (path patching's method="attribution", once that method exists; until then
   the part records "not available").
3. `geometry.*`: a random LLaMA at 7B head geometry (d_model 4096, 32 x 32 heads, bf16, built
   on the device; no download) with paper-like receivers (`bench_7b_geometry.py`): `build`,
   `forward` (one plain forward of 300 prompts), `fast_sweep` (the fast four-step sweep; time
   per step; fewer prompts if the budget demands it, said in the JSON), `reference` (the
   reference on a few senders per step, extrapolated: the ratio), `dcm_epoch` (one DCM epoch of
   a 20-head group), `cmap` (one CMAP pass between two random models) and `attribution` (the
   attribution sweep, once it exists). Peak GPU memory for each.
4. The summary: one table on stdout, also in the JSON (`summary`).

A part that runs out of its budget is cut and keeps what it finished; one that fails records
its error; the rest still runs (`budgeted_parts.py`). Exit status: 0, or 1 when a check failed
or a part raised (the JSON says which), or 2 for an unusable setup (e.g. `--device cuda`
without CUDA), in one line.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

STARTED = time.perf_counter()  # before torch and TransformerLens are imported

import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from bench_7b_geometry import DTYPES, GEOMETRIES, paper_like_receivers, random_llama, timed  # noqa: E402
from bench_dcm import circuit_of  # noqa: E402
from budgeted_parts import NotAvailable, Part, Report, Skipped, format_table, summary_rows  # noqa: E402

from et_circuits import models  # noqa: E402
from et_circuits.core.circuit import Circuit  # noqa: E402
from et_circuits.core.errors import SetupError  # noqa: E402
from et_circuits.core.forward import last_logits  # noqa: E402
from et_circuits.core.metrics import answer_prob  # noqa: E402
from et_circuits.core.settings import RunSettings, resolve_device  # noqa: E402
from et_circuits.methods import attribution, discovery  # noqa: E402
from et_circuits.methods import path_patching as pp  # noqa: E402
from et_circuits.methods.cmap import cmap, input_patches_for  # noqa: E402
from et_circuits.methods.dcm import DCMConfig  # noqa: E402
from et_circuits.methods.sweep import absolute_positions  # noqa: E402
from et_circuits.tasks.entity_tracking import data, recipe  # noqa: E402
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer  # noqa: E402
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS, TOP_K_CAP  # noqa: E402

DEFAULT_BUDGET = 480.0
DEFAULT_OUT = ROOT / "benchmarks" / "results"
N_BOXES = 7
# The fast four-step sweep at 7B head geometry costs about this many plain forwards
# (benchmarks/README.md: 11 + 15 + 18 + 111, plus the clean and corrupt runs); used to choose
# how many prompts fit the sweep's budget.
SWEEP_FORWARDS = 160
# DCM's cost per (base, source) pair in one-prompt forwards, a guess: the base's and the source's
# runs, the training step's forward and backward (from the heads' layer on) and its evaluation.
DCM_PROMPT_FORWARDS = 4
PP_TOLERANCE = 1e-4  # fp32 path-patching scores, device vs CPU
CMAP_TOLERANCE = 0.01
BASE, SOURCE = "organism-llama", "organism-goat"
ATTRIBUTION = "attribution"  # path_patch's method name once issue 28 lands


# bench_7b_geometry's geometries, and LLaMA-7B's 32 x 32 heads on a narrow residual stream
# (d_head 4): the head counts the 7B parts depend on (20-head groups spread over layers, senders
# over 32 layers) at a small cost (`--small --geometry heads --dtype float32`: minutes on CPU; bf16
# matrix products on CPU are many times slower).
GEOMETRIES = {**GEOMETRIES, "heads": dict(n_layers=32, n_heads=32, d_model=128, d_mlp=256, vocab=None)}


@dataclass(frozen=True)
class Sizes:
    """How much each part computes: the paper's sizes on a GPU, a few prompts for `--small`."""

    pp_n: int  # organism path-patching prompts
    table1_n: int  # Table 1 evaluation prompts = reference prompts
    table1_random: int
    dcm: tuple[int, int, int]  # organism DCM train / eval / test pairs
    cmap_n: int
    geometry: str  # a key of GEOMETRIES
    n: int  # prompts at 7B geometry
    dcm_7b: tuple[int, int, int]
    reference_senders: int  # at most this many reference senders per step

    @classmethod
    def of(cls, small: bool, on_gpu: bool) -> Sizes:
        if small:
            return cls(16, 24, 2, (64, 32, 64), 24, "small", 16, (64, 32, 64), 4)
        return cls(300, 500, 10, (320, 160, 320), 500, "7b" if on_gpu else "cpu", 300, (1000, 500, 500), 4)


# Each part's share of the whole budget (they add up to 1), in the order they run.
PARTS: tuple[tuple[str, str, float], ...] = (
    ("environment", "environment", 0.02),
    ("correctness", "path_patching", 0.06),
    ("correctness", "table1", 0.05),
    ("correctness", "dcm", 0.05),
    ("correctness", "cmap", 0.04),
    ("correctness", "attribution", 0.03),
    ("geometry", "build", 0.04),
    ("geometry", "forward", 0.04),
    ("geometry", "fast_sweep", 0.29),
    ("geometry", "reference", 0.12),
    ("geometry", "dcm_epoch", 0.09),
    ("geometry", "cmap", 0.08),
    ("geometry", "attribution", 0.09),
)


@dataclass
class Bench:
    """What the parts share: the options, the device, the sizes, the organism models loaded so
    far, and the random 7B-geometry model with its prompts and receivers once `build` made them."""

    args: argparse.Namespace
    device: str
    sizes: Sizes
    dtype: torch.dtype
    settings: RunSettings
    organisms: dict = field(default_factory=dict)
    geo: dict = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def organism(self, name: str, where: str):
        """(model, tokenizer) of an organism model on `where` ("device" or "cpu"), loaded once;
        on a CPU run both are the same model."""
        device = self.device if where == "device" else "cpu"
        if (name, device) not in self.organisms:
            model, tok, _ = models.load(name, device=device)
            self.organisms[(name, device)] = (model, tok)
        return self.organisms[(name, device)]

    def both(self, name: str) -> dict:
        """{"device": model, "cpu": model} and the tokenizer."""
        (on_device, tok), (on_cpu, _) = self.organism(name, "device"), self.organism(name, "cpu")
        return {"device": on_device, "cpu": on_cpu}, tok


# ---------------------------------------------------------------------------------------------
# Devices: timing and memory


class GpuMeter:
    """Peak and resident GPU memory over each part (torch's allocator; nothing on a CPU run)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> dict:
        if not self.device.startswith("cuda"):
            return {}
        torch.cuda.synchronize(self.device)
        return {
            "peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3),
            "resident_gib": round(torch.cuda.memory_allocated(self.device) / 2**30, 3),
        }


def peak_gib(device: str) -> float | None:
    """Peak GPU memory since the last reset, in GiB (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(bench: Bench) -> None:
    """After every part: no hook left on any model (a cut part may stop inside a hooked run),
    pending GPU work finished, cached blocks returned."""
    for model, _ in bench.organisms.values():
        model.reset_hooks()
    for key in ("model", "source"):
        if key in bench.geo:
            bench.geo[key].reset_hooks()
    gc.collect()
    if bench.on_gpu:
        torch.cuda.synchronize(bench.device)
        torch.cuda.empty_cache()


def attribution_available() -> bool:
    """Whether path_patch has method="attribution" (issue 28)."""
    return ATTRIBUTION in getattr(pp, "METHODS", ())


def need_attribution() -> None:
    if not attribution_available():
        raise NotAvailable(
            f'et_circuits.methods.path_patching.path_patch has no method="{ATTRIBUTION}" yet '
            f"(methods: {', '.join(getattr(pp, 'METHODS', ()))}); this part runs once it has"
        )


# ---------------------------------------------------------------------------------------------
# 1. Environment


def package_versions() -> dict:
    out = {}
    for name in ("torch", "transformer-lens", "transformers", "peft", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def nvidia_driver() -> str | None:
    """The driver version nvidia-smi reports (None without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def bf16_matmul_ok(device: str) -> bool:
    """A bf16 matrix product on the device agrees with fp32 to bf16 precision."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    exact = a @ b
    got = (a.to(device, torch.bfloat16) @ b.to(device, torch.bfloat16)).float().cpu()
    return bool(((got - exact).abs().max() / exact.abs().max()).item() < 0.05)


def part_environment(part: Part, bench: Bench) -> None:
    """What ran: the device, its memory, versions, bf16, the float32 matmul settings. What needs
    another process (the commit, the driver) comes last, so that a cut keeps the rest."""
    device = bench.device
    part.set(
        device=device,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        packages=package_versions(),
        torch_cuda=torch.version.cuda,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
        NVIDIA_TF32_OVERRIDE=os.environ.get("NVIDIA_TF32_OVERRIDE"),
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    if bench.on_gpu:
        props = torch.cuda.get_device_properties(torch.device(device).index or 0)
        _, first_s = timed(lambda: torch.zeros(1, device=device), device)  # the first kernel launch
        part.set(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 2),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            gpus_visible=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            first_kernel_s=round(first_s, 3),
        )
    else:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        part.set(
            name=platform.processor() or platform.machine(),
            memory_gib=round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 2) if pages else None,
            bf16_supported=True,
        )
    part.set(bf16_matmul_ok=bf16_matmul_ok(device))
    info = part.record
    tf32 = info["tf32_matmul"] or info["float32_matmul_precision"] != "highest" or info["NVIDIA_TF32_OVERRIDE"] == "1"
    part.set(
        headline=f"{info['name']}, {info['memory_gib']} GiB, torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if bench.on_gpu else "")
        + f", bf16 {'yes' if info['bf16_supported'] and info['bf16_matmul_ok'] else 'NO'}"
        + (", TF32 ON (fp32 checks may fail)" if tf32 else "")
    )
    part.step("device", {"name": info["name"]})  # saved now; what follows may be slow
    part.set(commit=git_commit(), driver=nvidia_driver() if bench.on_gpu else None)


# ---------------------------------------------------------------------------------------------
# 2. Correctness on the organism: the device against the CPU


def organism_prompts(tok, n: int, seed: int):
    vocab = data.vocabulary(tok, min_objects=N_BOXES, min_labels=N_BOXES + 1)
    return recipe.path_patching_prompts(tok, vocab, n, N_BOXES, seed)


def compare_steps(part: Part, bench: Bench, method: str, tolerance) -> None:
    """The paper's four path-patching steps with `method` on the device and on the CPU, each
    step through the top-k of the CPU's previous step, compared score by score: the part passes
    when every |device - CPU| <= tolerance(max |score|)."""
    on, tok = bench.both(BASE)
    clean, corrupt = organism_prompts(tok, bench.sizes.pp_n, bench.args.seed)
    cfg = on["cpu"].cfg
    top_k = discovery.effective_top_k(recipe.PAPER_TOP_K, cfg.n_layers, cfg.n_heads, TOP_K_CAP)
    positions = [s.position for s in PAPER_STEPS]
    runs, prepare_s = {}, {}
    if method == "fast":
        for where, model in on.items():
            runs[where], prepare_s[where] = timed(
                lambda m=model: pp.prepare_runs(m, clean, corrupt, positions, bench.settings), bench.device
            )
        part.set(prepare_s={k: round(v, 3) for k, v in prepare_s.items()})
    previous, worst, ok = [], 0.0, True
    for step, k in zip(PAPER_STEPS, top_k):
        receivers = discovery.step_receivers(step, previous) or None
        scores, seconds = {}, {}
        for where, model in on.items():
            extra = {"runs": runs[where]} if where in runs else {}
            patch = partial(
                pp.path_patch, model, clean, corrupt, step.position, receivers=receivers, method=method, **extra
            )
            result, seconds[where] = timed(partial(patch, settings=bench.settings), bench.device)
            scores[where] = result.scores.float()
        both = ~(scores["device"].isnan() | scores["cpu"].isnan())
        diff = (scores["device"] - scores["cpu"])[both].abs().max().item() if both.any() else 0.0
        largest = scores["cpu"][both].abs().max().item() if both.any() else 0.0
        same_nan = bool((scores["device"].isnan() == scores["cpu"].isnan()).all())
        tol = tolerance(largest)
        ok = ok and diff <= tol and same_nan
        worst = max(worst, diff)
        previous = pp.top_heads(scores["cpu"], k)
        part.step(
            step.group,
            {
                "max_abs_diff": diff,
                "tolerance": tol,
                "max_abs_score": largest,
                "same_top_k": pp.top_heads(scores["device"], k) == previous,
                "same_nan": same_nan,
                "device_s": round(seconds["device"], 4),
                "cpu_s": round(seconds["cpu"], 4),
            },
        )
    part.set(
        n=len(clean),
        max_abs_diff=worst,
        **{"pass": ok},
        headline=f"max |device - cpu| {worst:.1e} over 4 steps, n={len(clean)}",
    )


def part_path_patching(part: Part, bench: Bench) -> None:
    part.set(check=f"fast method, fp32, every score within {PP_TOLERANCE:g} of the CPU's")
    compare_steps(part, bench, "fast", lambda largest: PP_TOLERANCE)


def part_correctness_attribution(part: Part, bench: Bench) -> None:
    need_attribution()
    part.set(check=f"attribution, fp32, every score within {PP_TOLERANCE:g} x max(1, max |score|) of the CPU's")
    compare_steps(part, bench, ATTRIBUTION, lambda largest: PP_TOLERANCE * max(1.0, largest))


def organism_circuit() -> Circuit:
    """The circuit the organism checks use: `make circuit`'s discovered circuit of
    organism-llama when results/ has it, else the one README reports (`bench_dcm.circuit_of`)."""
    return circuit_of(ROOT / "results", BASE)


def part_table1(part: Part, bench: Bench) -> None:
    on, tok = bench.both(BASE)
    circuit = organism_circuit()
    n = bench.sizes.table1_n
    plan = recipe.CircuitPlan(seed=bench.args.seed, evaluation_n=n, reference_n=n, n_random=bench.sizes.table1_random)
    part.set(check="Table 1 accuracies identical at 3 decimals", circuit=circuit.to_dict(), n=n)
    rows = {}
    for where, model in on.items():
        ev, seconds = timed(
            lambda m=model: recipe.table1_row(m, tok, circuit, plan, settings=bench.settings), bench.device
        )
        rows[where] = ev.as_row()
        part.step(where, {**rows[where], "seconds": round(seconds, 3)})
    differ = [k for k in rows["cpu"] if round(rows["cpu"][k], 3) != round(rows["device"][k], 3)]
    part.set(
        differ=differ,
        **{"pass": not differ},
        headline=", ".join(f"{k} {rows['device'][k]:.3f}" for k in ("full", "circuit", "random"))
        + (f"; differ: {', '.join(differ)}" if differ else "; same on cpu"),
    )


def part_dcm(part: Part, bench: Bench) -> None:
    on, tok = bench.both(BASE)
    circuit = organism_circuit()
    group = "value_fetcher"
    ask = recipe.Ask(tuple(sorted(circuit.groups[group])), circuit.positions[group], "object_value")
    plan = recipe.DCMPlan(sizes=bench.sizes.dcm, data_seed=recipe.SEED_OFFSETS["dcm"], seeds=(bench.args.seed,))
    part.set(check="one DCM training, fixed seed: the same selected heads", heads=list(ask.heads), sizes=plan.sizes)
    found = {}
    for where, model in on.items():
        result, seconds = timed(lambda m=model: recipe.run_dcm(m, tok, [ask], plan)[ask], bench.device)
        seed = result.seeds[result.selected_seed]
        found[where] = result.selected
        part.step(
            where,
            {
                "selected": result.selected,
                "eval_score": seed.eval_score,
                "test_score": seed.test_score,
                "best_step": seed.best_step,
                "steps": seed.steps,
                "seconds": round(seconds, 3),
            },
        )
    same = sorted(found["device"]) == sorted(found["cpu"])
    text = " ".join(f"L{l}H{h}" for l, h in found["device"]) or "none"
    part.set(**{"pass": same}, headline=f"selected {text}" + ("; same on cpu" if same else "; cpu differs"))


def part_cmap(part: Part, bench: Bench) -> None:
    on, tok = bench.both(BASE)
    sources, _ = bench.both(SOURCE)
    circuit = organism_circuit()
    selected = {
        group: {desideratum: circuit.groups[group]}
        for group, desideratum in recipe.SET_DESIDERATA.items()
        if desideratum is not None and group in circuit.groups
    }
    sets = recipe.cmap_head_sets(circuit, selected)
    variants = recipe.variants(sets, input_sets=["A"], input_patches=input_patches_for(on["cpu"]))
    prompts = recipe.prompts_for("cmap", tok, bench.sizes.cmap_n, N_BOXES, bench.args.seed)
    part.set(check=f"CMAP {SOURCE} -> {BASE}, every accuracy within {CMAP_TOLERANCE}", n=len(prompts))
    values = {}
    for where in on:
        result, seconds = timed(
            lambda w=where: cmap(on[w], sources[w], prompts, variants, settings=bench.settings), bench.device
        )
        values[where] = {"base": result.base, "source": result.source}
        values[where].update({f"{v.name}/{v.patch}": x for v, x in result.variants})
        part.step(where, {**values[where], "seconds": round(seconds, 3)})
    diffs = [
        abs(values["device"][k] - values["cpu"][k])
        for k in values["cpu"]
        if values["cpu"][k] == values["cpu"][k]  # NaN: an empty set, not patched
    ]
    worst = max(diffs, default=0.0)
    dev = values["device"]
    part.set(
        max_abs_diff=worst,
        **{"pass": worst <= CMAP_TOLERANCE},
        headline=f"base {dev['base']:.3f}, source {dev['source']:.3f}, A/z {dev.get('A/z', float('nan')):.3f}; "
        f"max |device - cpu| {worst:.3f}",
    )


# ---------------------------------------------------------------------------------------------
# 3. LLaMA-7B head geometry


def geometry_needed(bench: Bench) -> None:
    if "model" not in bench.geo:
        raise Skipped("no model: geometry.build did not finish")


def part_build(part: Part, bench: Bench) -> None:
    """A random LLaMA at the geometry, built on the device, paper-like receivers, the prompts."""
    args, sizes = bench.args, bench.sizes
    geometry = GEOMETRIES[args.geometry or sizes.geometry]
    tok = build_tokenizer()
    torch.manual_seed(args.seed)
    dims = {**geometry, "vocab": geometry["vocab"] or len(tok)}
    model, seconds = timed(lambda: random_llama(**dims, device=bench.device, dtype=bench.dtype), bench.device)
    bench.geo.update(model=model, tok=tok, dims=dims)
    cfg = model.cfg
    receivers_of = paper_like_receivers(cfg.n_layers, cfg.n_heads, random.Random(args.seed))
    n = args.n or sizes.n
    clean, corrupt = organism_prompts(tok, n, args.seed)
    bench.geo.update(receivers_of=receivers_of, clean=clean, corrupt=corrupt)
    parameters = sum(p.numel() for p in model.parameters())
    part.set(
        geometry=dims,
        dtype=str(bench.dtype).removeprefix("torch."),
        parameters=parameters,
        build_s=round(seconds, 3),
        prompts=n,
        seq_len=clean.seq_len,
        receivers={step: [list(h) for h in heads] for step, heads in receivers_of.items()},
        headline=f"{cfg.n_layers}x{cfg.n_heads} heads, d_model {cfg.d_model}, {parameters / 1e6:,.1f}M params, "
        f"{bench.dtype} in {seconds:.1f}s; {n} prompts of {clean.seq_len} tokens",
    )


def part_forward(part: Part, bench: Bench) -> None:
    """One plain forward over all prompts: a warm-up on one batch, then the best of three."""
    geometry_needed(bench)
    model, clean = bench.geo["model"], bench.geo["clean"]
    timed(lambda: last_logits(model, clean[: bench.settings.batch_size], settings=bench.settings), bench.device)
    times = []
    for i in range(3):
        reset_peak(bench.device)
        times.append(timed(lambda: last_logits(model, clean, settings=bench.settings), bench.device)[1])
        part.step(f"run{i + 1}", {"seconds": round(times[-1], 4), "peak_gib": peak_gib(bench.device)})
        bench.geo.update(forward_s=min(times), forward_n=len(clean))
    best = min(times)
    tokens = len(clean) * clean.seq_len
    part.set(
        forward_s=best,
        n=len(clean),
        tokens_per_s=round(tokens / best),
        headline=f"{best:.3f}s for {len(clean)} prompts ({tokens / best:,.0f} tokens/s), "
        f"batch {bench.settings.batch_size}",
    )


def prompts_that_fit(n: int, forward_s: float, budget_s: float, batch: int) -> int:
    """How many of `n` prompts the fast sweep can take in `budget_s` (80% of it, at about
    SWEEP_FORWARDS plain forwards of `forward_s` for n prompts), at least one batch."""
    affordable = int(n * 0.8 * budget_s / (SWEEP_FORWARDS * forward_s)) if forward_s > 0 else n
    return max(min(n, affordable), min(n, batch))


def geometry_prompts(bench: Bench, part: Part):
    """The prompts the sweep, reference and attribution use: all of them, or as many as the
    first of those parts to run can take in its budget (chosen once). `forward_s`, their unit
    of cost, is then one plain forward over these prompts."""
    if "n_used" not in bench.geo:
        clean = bench.geo["clean"]
        forward = bench.geo.get("forward_s")
        n = len(clean)
        used = n if forward is None else prompts_that_fit(n, forward, part.left(), bench.settings.batch_size)
        bench.geo["n_used"] = used
        reason = (
            None
            if used == n
            else f"{n} prompts would take about {SWEEP_FORWARDS} plain forwards of {forward:.2f}s; "
            f"{used} fit in 80% of the {part.left():.1f}s left"
        )
        part.set(n_requested=n, n_used=used, reduced_because=reason)
    used = bench.geo["n_used"]
    clean, corrupt = bench.geo["clean"][:used], bench.geo["corrupt"][:used]
    if bench.geo.get("forward_n") not in (None, used):  # the unit of cost at this prompt count
        model = bench.geo["model"]
        seconds = timed(lambda: last_logits(model, clean, settings=bench.settings), bench.device)[1]
        bench.geo.update(forward_s=seconds, forward_n=used)
    return clean, corrupt


def step_receivers(bench: Bench, step) -> list | None:
    return discovery.step_receivers(step, bench.geo["receivers_of"].get(step.group, [])) or None


def with_fewer_rows(bench: Bench, part: Part, fn):
    """fn(settings), and once more with a quarter of the rows and half the batch if the device
    runs out of memory (recorded in the part)."""
    try:
        return fn(bench.settings)
    except torch.OutOfMemoryError:
        pass  # leave the handler first: the failed attempt's tensors are freed with its traceback
    free_memory(bench)
    smaller = RunSettings(max(1, bench.settings.batch_size // 2), max(1, bench.settings.max_rows // 4), progress=False)
    part.set(out_of_memory_at={"batch_size": bench.settings.batch_size, "max_rows": bench.settings.max_rows})
    bench.settings = smaller
    return fn(smaller)


def part_fast_sweep(part: Part, bench: Bench) -> None:
    """The fast four-step sweep through paper-like receivers: the clean and corrupt runs, then
    each step, timed in seconds and in plain forwards."""
    geometry_needed(bench)
    model = bench.geo["model"]
    clean, corrupt = geometry_prompts(bench, part)
    forward = bench.geo.get("forward_s")
    positions = [s.position for s in PAPER_STEPS]
    reset_peak(bench.device)
    runs, seconds = timed(
        lambda: with_fewer_rows(bench, part, lambda s: pp.prepare_runs(model, clean, corrupt, positions, s)),
        bench.device,
    )
    part.step("clean_and_corrupt_runs", cost(seconds, forward, bench.device))
    total, fast = seconds, {}
    bench.geo["fast"] = fast
    for step in PAPER_STEPS:
        reset_peak(bench.device)
        result, seconds = timed(
            lambda st=step: with_fewer_rows(
                bench,
                part,
                lambda s: pp.path_patch(
                    model, clean, corrupt, st.position, receivers=step_receivers(bench, st), settings=s, runs=runs
                ),
            ),
            bench.device,
        )
        total += seconds
        fast[step.group] = {"scores": result.scores, "seconds": seconds}
        part.step(
            step.group, {**cost(seconds, forward, bench.device), "max_abs_score": result.scores.abs().max().item()}
        )
    runs = None  # the clean and corrupt runs' memory goes back before the next part
    bench.geo["fast_total_s"] = total
    part.set(
        total_s=round(total, 3),
        total_forwards=round(total / forward, 1) if forward else None,
        headline=f"4 steps {total:.1f}s"
        + (f" = {total / forward:.1f} forwards" if forward else "")
        + f", n={len(clean)}, max_rows {bench.settings.max_rows}",
    )


def cost(seconds: float, forward: float | None, device: str) -> dict:
    """A timing in seconds, in plain forwards, and the peak memory since the last reset."""
    return {
        "seconds": round(seconds, 4),
        "forwards": round(seconds / forward, 2) if forward else None,
        "peak_gib": peak_gib(device),
    }


def reference_senders(n_layers: int, n_heads: int, k: int, rng: random.Random) -> list[tuple[int, int]]:
    """`k` senders at layers spread evenly from the first to the last, a random head each."""
    layers = sorted({round(i * (n_layers - 1) / max(1, k - 1)) for i in range(k)})
    return [(layer, rng.randrange(n_heads)) for layer in layers]


def part_reference(part: Part, bench: Bench) -> None:
    """The reference method on a few senders per step (as many as the budget allows, at most
    `reference_senders`), extrapolated to all senders: fixed cost (no sender, measured once) +
    per-sender cost x all heads. The ratio is against the fast sweep's time for the same step."""
    geometry_needed(bench)
    model, forward = bench.geo["model"], bench.geo.get("forward_s") or 0.0
    clean, corrupt = geometry_prompts(bench, part)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    # A reference pass per sender is about 2 plain forwards (plus receivers); so is the fixed part.
    per_step = part.left() / len(PAPER_STEPS)
    k = max(1, min(bench.sizes.reference_senders, int((per_step / max(forward, 1e-9) - 4) / 3)))
    senders = reference_senders(n_layers, n_heads, k, random.Random(bench.args.seed))
    part.set(senders=[list(s) for s in senders], extrapolated_to=n_layers * n_heads)
    fixed = None
    fast = bench.geo.get("fast", {})
    total_ref, total_fast, ref_with_fast = 0.0, 0.0, 0.0
    for step in PAPER_STEPS:

        def reference(chosen, st=step):
            return pp.path_patch(
                model,
                clean,
                corrupt,
                st.position,
                receivers=step_receivers(bench, st),
                senders=chosen,
                method="reference",
                settings=bench.settings,
            )

        if fixed is None:
            fixed = timed(lambda: reference([]), bench.device)[1]
        reset_peak(bench.device)
        result, seconds = timed(lambda: reference(senders), bench.device)
        per_sender = max(seconds - fixed, 0.0) / len(senders)
        extrapolated = fixed + per_sender * n_layers * n_heads
        record = {
            "seconds": round(seconds, 4),
            "fixed_s": round(fixed, 4),
            "per_sender_s": round(per_sender, 4),
            "extrapolated_s": round(extrapolated, 2),
            "peak_gib": peak_gib(bench.device),
        }
        total_ref += extrapolated
        if step.group in fast:
            rows, cols = zip(*senders)
            ours = fast[step.group]["scores"][list(rows), list(cols)]
            record["max_abs_diff_fast"] = (ours - result.scores[list(rows), list(cols)]).abs().max().item()
            record["ratio"] = round(extrapolated / fast[step.group]["seconds"], 2)
            total_fast += fast[step.group]["seconds"]
            ref_with_fast += extrapolated
        part.step(step.group, record)
    complete = all(step.group in fast for step in PAPER_STEPS)
    if complete:
        ratio = total_ref / bench.geo["fast_total_s"]
        diffs = [part.record["steps"][s.group]["max_abs_diff_fast"] for s in PAPER_STEPS]
        part.set(
            reference_s=round(total_ref, 2),
            ratio=round(ratio, 2),
            ratio_steps_only=round(ref_with_fast / total_fast, 2),
            max_abs_diff_fast=max(diffs),
            headline=f"reference / fast {ratio:.1f}x (4 steps, clean and corrupt runs counted in fast; "
            f"{len(senders)} senders/step), max |diff| {max(diffs):.1e}",
        )
    else:
        part.set(
            reference_s=round(total_ref, 2),
            headline=f"reference extrapolated {total_ref:.1f}s for 4 steps; no ratio: the fast sweep did not finish",
        )


def part_dcm_epoch(part: Part, bench: Bench) -> None:
    """One DCM epoch (one seed) over group A's 20 heads at the last token, object-value pairs."""
    geometry_needed(bench)
    model, tok = bench.geo["model"], bench.geo["tok"]
    heads = tuple(sorted(bench.geo["receivers_of"]["pos_transmitter"]))  # group A: B's receivers
    ask = recipe.Ask(heads, "last", "object_value")
    sizes = bench.sizes.dcm_7b
    if bench.geo.get("forward_s"):
        sizes = dcm_sizes_that_fit(sizes, bench.geo["forward_s"] / bench.geo["forward_n"], part.left())
    plan = recipe.DCMPlan(config=DCMConfig(epochs=1), sizes=sizes, data_seed=recipe.SEED_OFFSETS["dcm"], seeds=(0,))
    part.set(
        heads=len(heads),
        sizes=plan.sizes,
        sizes_requested=bench.sizes.dcm_7b,
        reduced_because=None if sizes == bench.sizes.dcm_7b else "the paper's split would not fit the budget",
    )
    reset_peak(bench.device)
    result, seconds = timed(lambda: recipe.run_dcm(model, tok, [ask], plan)[ask], bench.device)
    seed = result.seeds[result.selected_seed]
    part.step(
        "epoch",
        {
            "seconds": round(seconds, 3),
            "steps": seed.steps,
            "selected": len(result.selected),
            "test_score": seed.test_score,
            "peak_gib": peak_gib(bench.device),
        },
    )
    part.set(
        headline=f"{len(heads)} heads, {plan.sizes[0]} train pairs: {seconds:.1f}s for {seed.steps} steps "
        f"(pairs, training, test)"
    )


def dcm_sizes_that_fit(sizes: tuple[int, int, int], per_prompt_s: float, budget_s: float) -> tuple[int, int, int]:
    """DCM's train / eval / test pairs, scaled down (at least 64 / 32 / 64) when about
    DCM_PROMPT_FORWARDS prompt-forwards per pair would not fit in 70% of `budget_s`."""
    need = DCM_PROMPT_FORWARDS * sum(sizes) * per_prompt_s
    scale = min(1.0, 0.7 * budget_s / need) if need > 0 else 1.0
    if scale >= 1.0:
        return tuple(sizes)
    return tuple(max(least, int(x * scale)) for x, least in zip(sizes, (64, 32, 64)))


def geometry_sets(bench: Bench) -> dict[str, Circuit]:
    """The paper-like groups A, B, C at their positions, each a head set, and all of them."""
    positions = {s.group: s.position for s in PAPER_STEPS}
    receivers_of = bench.geo["receivers_of"]
    groups = {"value_fetcher": "pos_transmitter", "pos_transmitter": "pos_detector", "pos_detector": "struct_reader"}
    sets = {
        recipe.SET_NAMES[i]: Circuit({g: receivers_of[step]}, {g: positions[g]})
        for i, (g, step) in enumerate(groups.items())
    }
    sets[recipe.FULL] = Circuit({g: receivers_of[s] for g, s in groups.items()}, {g: positions[g] for g in groups})
    return sets


def part_geometry_cmap(part: Part, bench: Bench) -> None:
    """One CMAP pass into the model from a second random model of the same geometry: output
    patching of A, B, C and all, input patching of A."""
    geometry_needed(bench)
    model, tok = bench.geo["model"], bench.geo["tok"]
    torch.manual_seed(bench.args.seed + 1)
    source, build_s = timed(
        lambda: random_llama(**bench.geo["dims"], device=bench.device, dtype=bench.dtype), bench.device
    )
    try:
        bench.geo["source"] = source
        part.step("source_built", {"seconds": round(build_s, 3)})
        sets = geometry_sets(bench)
        variants = recipe.variants(sets, input_sets=["A"], input_patches=input_patches_for(model))
        prompts = recipe.prompts_for("cmap", tok, bench.geo.get("n_used", len(bench.geo["clean"])), N_BOXES, 0)
        reset_peak(bench.device)
        result, seconds = timed(lambda: cmap(model, source, prompts, variants, settings=bench.settings), bench.device)
        part.step("pass", {"seconds": round(seconds, 3), "variants": len(variants), "peak_gib": peak_gib(bench.device)})
        part.set(
            n=len(prompts), headline=f"{len(variants)} variants on {len(prompts)} prompts: {seconds:.1f}s (2 models)"
        )
    finally:
        bench.geo.pop("source", None)


def part_geometry_attribution(part: Part, bench: Bench) -> None:
    """The attribution sweep of the four steps (once it exists), its peak memory, and how its
    ranking agrees with the fast sweep's (Spearman over all senders); then the attribution
    position sweep over every token (chunked backward over the prompts) and its peak memory."""
    need_attribution()
    geometry_needed(bench)
    model = bench.geo["model"]
    clean, corrupt = geometry_prompts(bench, part)
    forward, fast = bench.geo.get("forward_s"), bench.geo.get("fast", {})
    total = 0.0
    for step in PAPER_STEPS:
        reset_peak(bench.device)
        result, seconds = timed(
            lambda st=step: pp.path_patch(
                model,
                clean,
                corrupt,
                st.position,
                receivers=step_receivers(bench, st),
                method=ATTRIBUTION,
                settings=bench.settings,
            ),
            bench.device,
        )
        total += seconds
        record = cost(seconds, forward, bench.device)
        if step.group in fast:
            record["spearman_fast"] = spearman(result.scores, fast[step.group]["scores"])
        part.step(step.group, record)
    headline = f"4 steps {total:.1f}s" + (f" = {total / forward:.1f} forwards" if forward else "")
    part.set(total_s=round(total, 3), headline=headline)
    swept, names = absolute_positions(clean)
    corrupt_at = corrupt.replace(positions={p: swept.positions[p] for p in names})
    reset_peak(bench.device)
    _, seconds = timed(
        lambda: attribution.sweep_attribution(model, swept, corrupt_at, names, answer_prob, bench.settings.batch_size),
        bench.device,
    )
    part.step("position_sweep", {**cost(seconds, forward, bench.device), "positions": len(names)})
    part.set(headline=f"{headline}; sweep of {len(names)} positions {seconds:.1f}s")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation over the entries both score (no NaN), ties at their average
    rank (senders at or above every receiver all score exactly 0). NaN if either is constant."""
    keep = ~(a.isnan() | b.isnan())
    ra, rb = (pd.Series(x[keep].double().cpu().numpy()).rank() for x in (a, b))
    return float(ra.corr(rb))


FUNCTIONS = {
    "environment": part_environment,
    "correctness.path_patching": part_path_patching,
    "correctness.table1": part_table1,
    "correctness.dcm": part_dcm,
    "correctness.cmap": part_cmap,
    "correctness.attribution": part_correctness_attribution,
    "geometry.build": part_build,
    "geometry.forward": part_forward,
    "geometry.fast_sweep": part_fast_sweep,
    "geometry.reference": part_reference,
    "geometry.dcm_epoch": part_dcm_epoch,
    "geometry.cmap": part_geometry_cmap,
    "geometry.attribution": part_geometry_attribution,
}
PART_KEYS = tuple(FUNCTIONS)


# ---------------------------------------------------------------------------------------------
# Command line


def part_budget(text: str) -> tuple[str, float]:
    """NAME=SECONDS for --part-budget."""
    name, _, seconds = text.partition("=")
    if name not in FUNCTIONS:
        raise argparse.ArgumentTypeError(f"unknown part {name!r}; parts: {', '.join(PART_KEYS)}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part-budget needs NAME=SECONDS, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--small", action="store_true", help="every part at small sizes: the CPU rehearsal")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all parts (default 480)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="the JSON file, or a folder for gpu_check_<device>.json (default benchmarks/results/)",
    )
    p.add_argument("--parts", nargs="+", default=None, help="run only these parts or sections (e.g. geometry)")
    p.add_argument("--part-budget", type=part_budget, action="append", default=[], help="NAME=SECONDS for one part")
    p.add_argument("--n", type=int, default=None, help="prompts at 7B geometry (default 300; --small 16)")
    p.add_argument(
        "--geometry",
        choices=list(GEOMETRIES),
        default=None,
        help="of the random model (default 7b on a GPU, small with --small, cpu on CPU: bench_7b_geometry's; "
        "heads: 32 x 32 heads at d_model 128)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="of the 7B-geometry model (default bfloat16; float32 for --device cpu without --small, where "
        "bf16 matrix products are ~30x slower)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="prompts per plain forward (default 32; --small 8)")
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="rows per pass of fast path patching (default 4096; --small 32, so that the passes are split "
        "over prompts as at 7B geometry)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the organism's small matrices run fastest on one, and the CPU "
        "references then leave the other cores alone)",
    )
    return p


def checked_device(name: str) -> str:
    """The device, or SetupError in one line saying why it cannot be used."""
    if name.startswith("cuda") and torch.version.cuda is None:
        raise SetupError(f"this torch ({torch.__version__}) is built without CUDA; install a CUDA build to use {name}")
    return resolve_device(name)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def out_path(out: Path, device: str, small: bool) -> Path:
    """`out` itself for a .json name, else gpu_check_<device name>[_small].json inside it."""
    if out.suffix == ".json":
        return out
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return out / f"gpu_check_{slug(name)}{'_small' if small else ''}.json"


def selected(key: str, parts: list[str] | None) -> bool:
    return parts is None or any(key == p or key.startswith(p + ".") for p in parts)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        device = checked_device(args.device)
        unknown = [p for p in args.parts or [] if not any(selected(k, [p]) for k in PART_KEYS)]
        if unknown:
            raise SetupError(f"unknown part {unknown[0]!r}; parts: {', '.join(PART_KEYS)}")
        if min(args.budget, args.batch_size or 1, args.max_rows or 1, args.threads, args.n or 1) <= 0:
            raise SetupError("--budget, --batch-size, --max-rows, --threads and --n must be positive")
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (8 if args.small else 32)
    args.max_rows = args.max_rows or (32 if args.small else 4096)
    bench = Bench(
        args,
        device,
        Sizes.of(args.small, device.startswith("cuda")),
        DTYPES[args.dtype or ("float32" if device == "cpu" and not args.small else "bfloat16")],
        RunSettings(args.batch_size, args.max_rows, progress=False),
    )
    path = out_path(args.out, device, args.small)
    header = {
        "what": "et_circuits gpu_check (benchmarks/gpu_check.py)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": device,
        "small": args.small,
        "sizes": bench.sizes.__dict__,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "import_s": round(time.perf_counter() - STARTED, 2),
    }
    report = Report(
        path,
        header,
        args.budget,
        cleanup=lambda: free_memory(bench),
        meter=GpuMeter(device),
        overrides=dict(args.part_budget),
    )
    print(f"gpu_check on {device}, budget {args.budget:g}s, writing {path}", flush=True)
    for section, name, share in PARTS:
        key = name if section == name else f"{section}.{name}"
        skip = None if selected(key, args.parts) else "not asked for (--parts)"
        record = report.run(section, name, share, lambda part, f=FUNCTIONS[key]: f(part, bench), skip=skip)
        print(
            f"[{time.perf_counter() - report.started:6.1f}s] {key}: {record['status']} in {record['seconds']:.1f}s "
            f"(budget {record['budget_s']:g}s)" + (f" - {record.get('error')}" if "error" in record else ""),
            flush=True,
        )
    rows = summary_rows(report)
    report.close(rows)
    print(format_table(rows))
    print(f"wrote {path} (wall {time.perf_counter() - STARTED:.1f}s including imports)")
    failed = [r["part"] for r in rows if r["status"] == "error" or r["check"] == "FAIL"]
    if failed:
        print(f"gpu_check: {', '.join(failed)} failed (see {path})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
