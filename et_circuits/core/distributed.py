"""Scaling out on torch.distributed. Launched with torchrun, a stage shards its independent work
over the ranks: every rank runs the same program, computes its share of each sharded loop
(path-patching sender batches, position-sweep positions, DCM mask stacks, CMAP variants,
knockout edges), and receives everyone's results, so that whatever follows a sharded loop runs
identically everywhere. Only rank 0 writes files (`io.atomic_path`). Where a stage has at least
as many whole units of work as ranks (its models), `split` gives each unit to one rank, which
computes it `alone` (its loops unsharded, its files written by itself): nothing is repeated on
every rank. Items are shared out by estimated cost where it is known (`assign`: longest first).
Without torchrun (no WORLD_SIZE) everything is one process and these functions cost nothing.

    torchrun --nproc_per_node 2 -m -- et_circuits dcm --model organism-llama --base organism-llama

(`--` keeps torchrun's own parser off the stage's arguments: it reads `--n` as an abbreviation
of its `--nnodes`.)

The backend is nccl where every rank has a GPU (rank r on cuda:LOCAL_RANK), gloo otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")
_alone = 0  # depth of `alone()` blocks: inside one, this rank acts as the only process
# Where this rank's time went in each sharded loop of more than one rank: {"items": n, "own":
# [[index, seconds], ...], "wait": seconds in the exchange (waiting for slower ranks)}.
LOOPS: list[dict] = []


def launched() -> bool:
    """True in a process torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun set up (idempotent; nothing without torchrun)."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"
        dist.init_process_group(backend)


def finish(ok: bool = True) -> None:
    """Leave the process group: after a successful command wait for every rank first, so that
    no rank exits while another still talks to it (a rank that left early made gloo abort the
    last one), then destroy the group. Nothing without torchrun."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() and not _alone else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() and not _alone else 0


@contextmanager
def alone() -> Iterator[None]:
    """Inside, this rank acts as a single process: it computes every item of the sharded loops
    it meets and writes its own files (for whole work units, such as a model, that one rank
    does entirely: `split`)."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def barrier() -> None:
    """Wait until every rank is here (nothing in one process)."""
    if world() > 1:
        dist.barrier()


def assign(costs: Sequence[float], n_ranks: int) -> list[list[int]]:
    """Longest processing time first: item indices for each of n_ranks, the costliest item to
    the least loaded rank (ties: the lower index, to the rank with fewer items, then the lower
    rank; so equal costs go round robin), each rank's indices in ascending order.
    Deterministic, so every rank computes the same assignment."""
    loads = [0.0] * n_ranks
    out: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n_ranks), key=lambda r: (loads[r], len(out[r]), r))
        loads[r] += costs[i]
        out[r].append(i)
    return [sorted(part) for part in out]


def first_process() -> bool:
    """True in one process of a run: torchrun's rank 0 (also inside `alone`), or the only one.
    Progress bars show there only, so that ranks do not interleave theirs."""
    return int(os.environ.get("RANK", "0")) == 0


def is_writer() -> bool:
    """Whether this process writes result files: rank 0, or the only process."""
    return rank() == 0


def local_device(n_devices: int = 1) -> str:
    """This rank's first GPU under torchrun (cuda:LOCAL_RANK, or with models split over
    n_devices GPUs each, cuda:LOCAL_RANK * n_devices), else "cuda"."""
    if launched() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK']) * n_devices}"
    return "cuda"


def mine(n: int, costs: Sequence[float] | None = None) -> Sequence[int]:
    """The indices of n work items this rank computes: round robin, or with each item's
    estimated `costs`, balanced by cost (`assign`)."""
    if costs is None or world() == 1:
        return range(rank(), n, world())
    return assign(costs, world())[rank()]


def sharded_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    on_done: Callable[[int, R], None] | None = None,
    costs: Sequence[float] | None = None,
) -> list[R]:
    """[fn(item) for item in items], each item computed by one rank (balanced by `costs` where
    given, see `mine`) and the results sent to all. `on_done(i, result)` runs as each of this
    rank's items finishes, then (after the exchange) for everyone else's, so a single process
    still reports item by item."""
    own, seconds = {}, []
    for i in mine(len(items), costs):
        start = time.perf_counter()
        own[i] = fn(items[i])
        seconds.append([i, round(time.perf_counter() - start, 3)])
        if on_done is not None:
            on_done(i, own[i])
    if world() == 1:
        return [own[i] for i in range(len(items))]
    gathered: list[dict[int, R] | None] = [None] * world()
    start = time.perf_counter()
    dist.all_gather_object(gathered, own)
    LOOPS.append({"items": len(items), "own": seconds, "wait": round(time.perf_counter() - start, 3)})
    results = {i: r for part in gathered for i, r in part.items()}
    if on_done is not None:
        for i in sorted(set(results) - set(own)):
            on_done(i, results[i])
    return [results[i] for i in range(len(items))]


def combine_nan(t: torch.Tensor) -> torch.Tensor:
    """Entries computed by exactly one rank (NaN on the others) from every rank (a CPU tensor;
    entries NaN everywhere stay NaN). Exact: each entry is one rank's value."""
    if world() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t.contiguous())
    stack = torch.stack(parts)
    return torch.where(stack.isnan().all(0), torch.full_like(t, float("nan")), stack.nan_to_num(0.0).sum(0))


def sum_counts(counts: list[int]) -> list[int]:
    """Integer counts summed over the ranks (each rank counted its share; exact)."""
    if world() == 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


def split(fn: Callable[[T], R], items: Sequence[T], costs: Sequence[float] | None = None) -> list[R]:
    """`sharded_map` over whole work units (such as the models of a stage): each rank computes
    its items `alone`, so every sharded loop inside runs unsharded and the rank writes the
    item's files itself; everyone receives every result."""

    def whole(item: T) -> R:
        with alone():
            return fn(item)

    return sharded_map(whole, items, costs=costs)
