"""DCM with the masks of one head set trained together (the default) vs one mask at a time
(`max_stacked_rows` = one batch), in the same run, on organism-llama's discovered circuit as
`make dcm` asks it (every group on the three main desiderata, three seeds, the organism's
split sizes). Prints both times, whether the selected heads and accuracies agree, and last
`dcm batching speedup=<one at a time / batched wall time>`.

    python benchmarks/bench_dcm.py [--model organism-llama] [--results results]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from et_circuits import models  # noqa: E402
from et_circuits.core.circuit import Circuit  # noqa: E402
from et_circuits.tasks.entity_tracking import desiderata, recipe  # noqa: E402


def circuit_of(results: Path, name: str) -> Circuit:
    """The discovered circuit `make circuit` wrote, else organism-llama's as README reports it."""
    path = results / name / "discovered" / "circuit.json"
    if path.exists():
        return Circuit.load(path)
    binder = ("prev_query_label+1", "prev_query_label+2")
    return Circuit(
        {
            "value_fetcher": [(1, 2), (1, 3), (1, 1)],
            "pos_transmitter": [(0, 1), (0, 0)],
            "binder": [(0, 1), (0, 0), (0, 3)],
        },
        {"value_fetcher": "last", "pos_transmitter": "last", "binder": binder},
    )


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism-llama")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--sizes", type=int, nargs=3, default=(320, 160, 320), help="train, eval, test pairs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CLI uses 1 for the organism)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, spec = models.load(args.model, device="cpu")
    circuit = circuit_of(args.results, spec.name)
    asks = [ask for _, ask in recipe.asks_for(circuit, {g: desiderata.MAIN for g in circuit.groups})]
    plan = recipe.DCMPlan(sizes=tuple(args.sizes), data_seed=recipe.SEED_OFFSETS["dcm"])
    alone = dataclasses.replace(plan, config=dataclasses.replace(plan.config, max_stacked_rows=plan.config.batch_size))
    times, found = {}, {}
    for name, which in (("batched", plan), ("one at a time", alone)):
        t0 = time.perf_counter()
        found[name] = recipe.run_dcm(model, tok, asks, which)
        times[name] = time.perf_counter() - t0
        print(f"{name}: {len(asks) * len(plan.seeds)} masks in {times[name]:.1f}s", flush=True)
    same = all(
        (a.selected_seed, a.resampled, [r.heads for r in a.seeds.values()])
        == (b.selected_seed, b.resampled, [r.heads for r in b.seeds.values()])
        for a, b in zip(found["batched"].values(), found["one at a time"].values())
    )
    print(f"same selected heads and accuracies: {same}")
    ratio = times["one at a time"] / times["batched"]
    print(f"dcm batching speedup={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
