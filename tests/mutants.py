"""Mutation checking of the glue (not part of `make test`): each mutant is one textual change to
the package, a realistic bug in what connects the methods to the results a user reads (reuse
keys, flags, the recipe's protocol choices). The driver copies the working tree to a scratch
folder once, applies one mutant at a time, runs that mutant's tests and reports whether they
caught it (a test failed) or missed it (all passed).

    .venv/bin/python tests/mutants.py                 # every mutant
    .venv/bin/python tests/mutants.py --only lr-flag  # some, by name
    .venv/bin/python tests/mutants.py --list

The mutants' texts must each occur exactly once in their file (checked before running)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "tests/unit/pipeline"
KEYS = tuple(f"{PIPELINE}/{name}.py" for name in ("test_reuse_keys", "test_reuse_keys_dcm", "test_results"))
FLAGS = (f"{PIPELINE}/test_flags_reach.py",)
RECIPE = "tests/unit/tasks/test_recipe_protocol.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # under et_circuits/
    old: str
    new: str
    tests: tuple[str, ...] = KEYS


MUTANTS = [
    # reuse keys
    Mutant("step-key-no-weights", "pipeline/stages/circuit.py", '"weights": weights_digest(model),', ""),
    Mutant("step-key-no-n", "pipeline/stages/circuit.py", '"n": str(args.n),', ""),
    Mutant("step-key-no-receivers", "pipeline/results/layout.py", '"receivers": str(heads),', '"receivers": "",'),
    Mutant("step-key-no-method", "pipeline/results/layout.py", '"method": method,\n        "receivers"', '"receivers"'),
    Mutant("step-key-no-position", "pipeline/results/layout.py", '"position": str(step.position),', ""),
    Mutant(
        "step-reuse-any-file", "pipeline/results/layout.py", "if step_metadata(path) != key:", "if not path.exists():"
    ),
    Mutant(
        "dcm-key-ignores-lr",
        "pipeline/results/dcm.py",
        '"inference_batch_size", "max_stacked_rows",',
        '"lr", "max_stacked_rows",',
    ),
    Mutant("dcm-key-no-weights", "pipeline/results/dcm.py", '"weights": weights,', ""),
    Mutant(
        "dcm-runs-without-weights",
        "pipeline/stages/dcm.py",
        "RunsFile(out / results.DCM_RUNS, plan, weights_digest(model))",
        "RunsFile(out / results.DCM_RUNS, plan)",
    ),
    Mutant(
        "means-key-no-batch",
        "methods/evaluation.py",
        "{weights_digest(model)} {batch_size} ",
        "{weights_digest(model)} ",
    ),
    Mutant(
        "weights-digest-one-tensor",
        "core/digest.py",
        "in model.named_parameters():",
        "in list(model.named_parameters())[:1]:",
    ),
    # flags
    Mutant("lr-flag", "pipeline/stages/dcm.py", "lr=args.lr,", "lr=0.1,", FLAGS),
    Mutant("mark-flag", "pipeline/stages/circuit.py", "mark=args.mark,", "mark=0.2,", FLAGS),
    Mutant("table1-reference-n-flag", "pipeline/stages/table1.py", "reference_n=args.reference_n, ", "", FLAGS),
    Mutant("dtype-flag", "pipeline/running.py", "dtype=args.dtype,", 'dtype="float32",', FLAGS),
    Mutant("max-rows-flag", "pipeline/running.py", 'getattr(args, "max_rows", FAST_ROWS)', "FAST_ROWS", FLAGS),
    Mutant(
        "source-device-flag",
        "pipeline/stages/cmap.py",
        "load_model(name, args, args.source_device)",
        "load_model(name, args)",
        FLAGS,
    ),
    Mutant("extra-flag", "pipeline/stages/dcm.py", 'args.extra == "all"', 'args.extra == "none"', FLAGS),
    # a flag that reaches one of its uses but not another
    Mutant(
        "knockout-context-seed-fixed",
        "pipeline/stages/knockout.py",
        "with_random_context(prompts, args.seed)",
        "with_random_context(prompts, 0)",
        FLAGS,
    ),
    Mutant(
        "dcm-training-seeds-ignore-seed",
        "pipeline/stages/dcm.py",
        "seeds = tuple(args.seed + i for i in range(args.seeds))",
        "seeds = tuple(range(args.seeds))",
        FLAGS + KEYS,
    ),
    Mutant(
        "dcm-resample-seed-fixed",
        "pipeline/stages/dcm.py",
        "        args.resamples,\n        args.seed,\n",
        "        args.resamples,\n        0,\n",
        FLAGS + KEYS,
    ),
    # the recipe's protocol choices
    Mutant(
        "table1-means-over-evaluation",
        "tasks/entity_tracking/recipe/circuits.py",
        "means = position_means(model, reference, settings=settings, cache_dir=means_cache)\n    return",
        "means = position_means(model, batch, settings=settings, cache_dir=means_cache)\n    return",
        (RECIPE,),
    ),
    Mutant(
        "binder-receives-from-B",
        "tasks/entity_tracking/recipe/circuits.py",
        '"kv", PAPER_STEPS[0].group)',
        '"kv", PAPER_STEPS[1].group)',
        (RECIPE,),
    ),
    Mutant(
        "dcm-eval-overlaps-train",
        "tasks/entity_tracking/desiderata.py",
        "return Splits(pairs[:a], pairs[a:b], pairs[b:])",
        "return Splits(pairs[:a], pairs[: b - a], pairs[b:])",
        (RECIPE, "tests/unit/tasks/test_desiderata.py"),
    ),
    Mutant(
        "dcm-data-seed-shared",
        "pipeline/stages/dcm.py",
        'args.seed + recipe.SEED_OFFSETS["dcm"],',
        "args.seed,",
        (PIPELINE,),
    ),
    Mutant(
        "minimality-on-reference-prompts",
        "tasks/entity_tracking/recipe/circuits.py",
        'plan.minimality_n, n_boxes, seed + SEED_OFFSETS["minimality"]',
        'plan.minimality_n, n_boxes, seed + SEED_OFFSETS["reference"]',
        (RECIPE,),
    ),
    Mutant(
        "segment-at-start-queries-the-front",
        "tasks/entity_tracking/desiderata.py",
        "queries=range(1, base.n_boxes)",
        "queries=range(0, base.n_boxes)",
        ("tests/unit/tasks",),
    ),
    Mutant(
        "boxes-before-one-box",
        "tasks/entity_tracking/desiderata.py",
        "queries=range(2, base.n_boxes)",
        "queries=range(1, base.n_boxes)",
        ("tests/unit/tasks",),
    ),
    # small operations
    Mutant(
        "random-baseline-unseeded",
        "methods/evaluation.py",
        "rng = random.Random(seed)",
        "rng = random.Random()",
        ("tests/unit/methods/test_random_baseline.py", "tests/unit/methods/test_evaluation.py"),
    ),
    Mutant(
        "completeness-model-without-is-circuit-without",
        "methods/minimality.py",
        "[circuit.keep_only(s) for _, _, s in subsets], prompts, means, ablate_circuit=True",
        "[circuit.without(s) for _, _, s in subsets], prompts, means",
        ("tests/unit/methods/test_completeness_oracle.py", "tests/unit/methods/test_minimality.py"),
    ),
    Mutant(
        "without-drops-the-head-from-every-group",
        "core/circuit.py",
        "[h for h in hs if (g, h) not in drop]",
        "[h for h in hs if h not in {x for _, x in drop}]",
        ("tests/unit/core",),
    ),
    Mutant(
        "logit-diff-max-wrong",
        "core/metrics.py",
        "prompts.wrong_answers.to(logits.device)).mean(-1)",
        "prompts.wrong_answers.to(logits.device)).amax(-1)",
        ("tests/unit/core",),
    ),
    Mutant(
        "smallest-ignores-keep",
        "methods/sweep.py",
        "strength[_key(other)] >= keep * strength[_key(big)]",
        "strength[_key(other)] >= 0",
        ("tests/unit/methods/test_sweep_smallest.py", "tests/unit/methods/test_sweep.py"),
    ),
    # which circuit or file a stage uses
    Mutant(
        "cmap-patches-the-base-circuits-heads",
        "pipeline/stages/cmap.py",
        "section = SECTIONS_OF[reading][1]",
        "section = SECTIONS_OF[reading][0]",
        (PIPELINE,),
    ),
    Mutant(
        "table1-evaluates-each-models-own-circuit",
        "pipeline/stages/table1.py",
        "circuits[(base_name, reading)],",
        "circuits[(name, reading)],",
        (PIPELINE,),
    ),
    Mutant(
        "discovered-reading-written-over-the-paper-one",
        "pipeline/stages/circuit.py",
        "out = results.reading_dir(args.results, name, reading)",
        'out = results.reading_dir(args.results, name, "paper")',
        (PIPELINE,),
    ),
    Mutant(
        "dcm-entry-mean-of-test-accuracy",
        "pipeline/results/dcm.py",
        '"accuracy_mean": result.mean,',
        '"accuracy_mean": result.test_mean,',
        (PIPELINE,),
    ),
    Mutant(
        "discovered-steps-take-the-last-top-k",
        "tasks/entity_tracking/recipe/circuits.py",
        "top_k = top_k[: len(steps)]",
        "top_k = top_k[-len(steps) :]",
        (RECIPE, PIPELINE),
    ),
    Mutant(
        "table1-random-circuits-seed-fixed",
        "tasks/entity_tracking/recipe/circuits.py",
        "n_random=plan.n_random, seed=seed,",
        "n_random=plan.n_random, seed=0,",
        (RECIPE, PIPELINE),
    ),
    Mutant(
        "completeness-random-sets-seed-fixed",
        "tasks/entity_tracking/recipe/circuits.py",
        "n_random=plan.completeness_random, seed=seed,",
        "n_random=plan.completeness_random, seed=0,",
        (RECIPE, PIPELINE),
    ),
    # what dcm.json records of its settings
    Mutant(
        "dcm-json-records-lam-as-lr", "pipeline/stages/dcm.py", '"lr": config.lr,', '"lr": config.lam,', (PIPELINE,)
    ),
    # which prompt set a stage draws
    Mutant(
        "cmap-draws-knockouts-prompts",
        "pipeline/stages/cmap.py",
        'prompts_for("cmap"',
        'prompts_for("knockout"',
        (PIPELINE,),
    ),
    Mutant(
        "knockout-draws-cmaps-prompts",
        "pipeline/stages/knockout.py",
        'prompts_for("knockout"',
        'prompts_for("cmap"',
        (PIPELINE,),
    ),
    # the sweep's marking rule
    Mutant(
        "sweep-marks-against-the-mean",
        "methods/sweep.py",
        "s >= mark * float(strength.max())",
        "s >= mark * float(strength.mean())",
        ("tests/unit/methods/test_sweep.py", "tests/unit/methods/test_sweep_smallest.py"),
    ),
]


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [line for line in out.stdout.splitlines() if line and (ROOT / line).is_file()]


def scratch_copy() -> Path:
    where = Path(tempfile.mkdtemp(prefix="et-mutants-"))
    for name in tracked_files():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, where / name)
    return where


def check(mutants: list[Mutant]) -> None:
    for m in mutants:
        text = (ROOT / "et_circuits" / m.path).read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"mutant {m.name}: its text occurs {text.count(m.old)} times in {m.path}")


def run(m: Mutant, where: Path, timeout: int) -> tuple[bool, float, str]:
    """(caught, seconds, last line of pytest's output) of one mutant."""
    path = where / "et_circuits" / m.path
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new))
    env = {**os.environ, "PYTHONPATH": str(where)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0", *m.tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=timeout)
        caught, tail = proc.returncode != 0, (proc.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        caught, tail = True, "timed out"
    finally:
        path.write_text(original)
    return caught, time.perf_counter() - t0, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="mutants to run, by name")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant (a timeout counts as caught)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        print("\n".join(f"{m.name}: {m.path}" for m in mutants))
        return 0
    check(mutants)
    where = scratch_copy()
    missed = []
    try:
        for m in mutants:
            caught, seconds, tail = run(m, where, args.timeout)
            print(f"{'caught' if caught else 'MISSED'} {m.name} ({seconds:.0f}s): {tail}", flush=True)
            if not caught:
                missed.append(m.name)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    print(f"{len(mutants) - len(missed)}/{len(mutants)} caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
