"""Circuit evaluation by mean ablation (as in Table 1 of Prakash et al. 2024).

F(C), a circuit's accuracy: every head's `hook_z` at every position is replaced by its
position-wise mean over a reference prompt set, except each group's heads at that group's
positions, which keep their own value. The random baseline draws circuits of the same group
sizes and positions uniformly at random; faithfulness = F(C) / full accuracy. The criteria
built on F (minimality, completeness) are in `minimality`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from et_circuits.core.circuit import Circuit
from et_circuits.core.digest import weights_digest
from et_circuits.core.errors import CircuitError, DataError
from et_circuits.core.forward import measure
from et_circuits.core.hooks import logits_at, mean_activations, replace_hooks
from et_circuits.core.io import read_tensors, write_tensors
from et_circuits.core.metrics import Metric, accuracy, metric_name, metric_value
from et_circuits.core.prompts import LAST, PromptSet
from et_circuits.core.restart import clean_run, earliest, run_from, same_start_chunks, tile
from et_circuits.core.serial import frame, number
from et_circuits.core.settings import QUIET, RunSettings


def keep_mask(
    circuit: Circuit, prompts: PromptSet, n_layers: int, n_heads: int
) -> Bool[Tensor, "layer batch pos head"]:
    """True where a head keeps its own activation: a group's heads at that group's positions.
    Everything else is mean-ablated."""
    keep = torch.zeros(n_layers, len(prompts), prompts.seq_len, n_heads, dtype=torch.bool)
    for g in circuit.groups:
        m = circuit.mask(g, n_layers, n_heads)  # layer head
        if not m.any():
            continue
        for spec in circuit.positions_of(g):
            at = prompts.position_set(spec).cpu()
            rows = torch.arange(len(prompts))[:, None].expand_as(at)
            valid = at >= 0
            keep[:, rows[valid], at[valid], :] |= m[:, None, :]
    return keep


def position_means(
    model: HookedTransformer,
    reference: PromptSet,
    *,
    settings: RunSettings = QUIET,
    cache_dir: str | os.PathLike | None = None,
) -> Float[Tensor, "layer pos head d"]:
    """Position-wise mean of every head's hook_z over the reference prompts (which must be in
    the layout of the prompts they ablate: as long, the same template). With `cache_dir`, the means are kept there as
    `means-<digest>.safetensors`, the digest naming the model's weights, the prompts and the
    batch size, so that stages computing the same means share one computation."""
    reference.check_vocab(model.cfg.d_vocab)
    if cache_dir is None:
        return mean_activations(model, reference.input_ids, "z", settings.batch_size)
    path = Path(cache_dir) / f"means-{_means_digest(model, reference, settings.batch_size)}.safetensors"
    if path.exists():
        return read_tensors(path)["means"].to(model.cfg.device)
    means = mean_activations(model, reference.input_ids, "z", settings.batch_size)
    write_tensors(path, {"means": means}, {"what": "position_means", "prompts": str(len(reference))})
    return means


def _means_digest(model: HookedTransformer, reference: PromptSet, batch_size: int) -> str:
    """sha256 over the weights (`weights_digest`: a sample of every parameter, the dtype), the
    prompts' token ids and the batch size (which fixes the summation order)."""
    digest = hashlib.sha256(f"{weights_digest(model)} {batch_size} {tuple(reference.input_ids.shape)}".encode())
    digest.update(reference.input_ids.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


ABLATION_METHODS = ("fast", "reference")


def ablated_scores(
    model: HookedTransformer,
    circuits: Sequence[Circuit],
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    *,
    metric: Metric = accuracy,
    settings: RunSettings = QUIET,
    ablate_circuit: bool = False,
    method: str = "fast",
) -> list[float]:
    """F(C) of each circuit: `metric` (default accuracy) with every head outside the circuit
    (or off its group's positions) replaced by its position-wise mean. With `ablate_circuit`,
    the complement: only the circuit's heads at their groups' positions are mean-ablated
    (F(M \\ C)). The circuits share forwards: the prompts repeated once per circuit, each row
    ablated as its circuit asks, at most `settings.max_rows` rows in a pass; the metric then
    reads each circuit's last-position logits at once. The two methods agree to rounding
    (`ablated_last_logits`)."""
    logits_of = torch.zeros(len(circuits), len(prompts), model.cfg.d_vocab)
    for which, row, logits in ablated_last_logits(
        model, circuits, prompts, means, settings=settings, ablate_circuit=ablate_circuit, method=method
    ):
        logits_of[which, row] = logits.float().cpu()
    cpu = prompts.to("cpu")
    return [metric_value(metric(logits, cpu)) for logits in logits_of]


def ablated_accuracies(
    model: HookedTransformer,
    circuits: Sequence[Circuit],
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    *,
    settings: RunSettings = QUIET,
    ablate_circuit: bool = False,
    method: str = "fast",
) -> list[float]:
    """`ablated_scores` with the accuracy metric."""
    return ablated_scores(
        model,
        circuits,
        prompts,
        means,
        metric=accuracy,
        settings=settings,
        ablate_circuit=ablate_circuit,
        method=method,
    )


def ablated_accuracy(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    *,
    settings: RunSettings = QUIET,
    ablate_circuit: bool = False,
) -> float:
    """`ablated_scores` of one circuit with the accuracy metric: F(C), or F(M \\ C) with
    `ablate_circuit`."""
    return ablated_accuracies(model, [circuit], prompts, means, settings=settings, ablate_circuit=ablate_circuit)[0]


@torch.no_grad()
def ablated_last_logits(
    model: HookedTransformer,
    circuits: Sequence[Circuit],
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    *,
    settings: RunSettings = QUIET,
    ablate_circuit: bool = False,
    method: str = "fast",
) -> Iterator[tuple[Tensor, Tensor, Float[Tensor, "rows vocab"]]]:
    """The last-position logits of every (circuit, prompt) under mean ablation, pass by pass:
    yields (circuit index, prompt index, logits) per row.

    - `reference`: a full forward per row, every head's `hook_z` replaced by its mean except
      where the circuit keeps it (with `ablate_circuit`, the other way round).
    - `fast` (default): before a prompt's first position that some circuit keeps (or, with
      `ablate_circuit`, ablates), every row is the same run: all heads ablated (or none). That
      run is made once per chunk of prompts, and each row restarts from it at that position
      (`restart.run_from`), attending to its keys and values before it."""
    if method not in ABLATION_METHODS:
        raise CircuitError(f"unknown ablation method {method!r}; expected one of {ABLATION_METHODS}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for circuit in circuits:
        circuit.validate(n_layers, n_heads)
    if means.shape[1] != prompts.seq_len:
        raise DataError(
            f"the ablation means are over {means.shape[1]} positions, the prompts have {prompts.seq_len}: "
            "position-wise means need reference prompts in the prompts' layout"
        )
    prompts.check_vocab(model.cfg.d_vocab)
    device = model.cfg.device
    means = means.to(device)
    cpu = prompts.to("cpu")
    last = cpu.position(LAST)

    def keep_of(which: Tensor, row: Tensor) -> Tensor:
        keep = torch.cat(
            [keep_mask(circuits[c], cpu[row[which == c]], n_layers, n_heads) for c in which.unique().tolist()], dim=1
        )
        return (~keep if ablate_circuit else keep).to(device)

    n, count = len(prompts), len(circuits)
    if method == "reference":
        rows = max(1, min(settings.max_rows, settings.batch_size * count))
        for start in range(0, count * n, rows):
            index = torch.arange(start, min(start + rows, count * n))
            which, row = index // n, index % n
            logits = model.run_with_hooks(
                cpu.input_ids[row].to(device), fwd_hooks=replace_hooks("z", means, keep_of(which, row))
            )
            yield which, row, logits_at(logits, last[row].to(device))
        return
    # Each prompt's first position where some circuit's rows leave the shared run (at most its last).
    first = last.clone()
    for circuit in circuits:
        for group, heads in circuit.groups.items():
            if heads:
                for spec in circuit.positions_of(group):
                    at = cpu.position_set(spec)
                    first = torch.minimum(first, torch.where((at >= 0).any(1), earliest(at), last))
    base = (
        []
        if ablate_circuit
        else replace_hooks(
            "z", means, torch.zeros(n_layers, 1, prompts.seq_len, n_heads, dtype=torch.bool, device=device)
        )
    )
    for part in same_start_chunks(first, max(1, min(settings.batch_size, settings.max_rows // count))):
        s = int(first[part[0]])
        run = clean_run(model, cpu.input_ids[part], base)
        which, rows = torch.arange(count).repeat_interleave(len(part)), part.repeat(count)  # `tile`'s layout
        hooks = replace_hooks("z", means[:, s:], keep_of(which, rows)[:, :, s:])
        prefix = run.restrict(0, s)
        x = tile(run.resid[0][:, s:], count)
        yield which, rows, run_from(model, x, 0, prefix.keys, prefix.values, hooks, read_at=(last[rows] - s).to(device))


def random_circuit(circuit: Circuit, n_layers: int, n_heads: int, rng: random.Random) -> Circuit:
    """A circuit with the same group sizes and positions, heads drawn uniformly at random."""
    all_heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    return Circuit({g: rng.sample(all_heads, len(hs)) for g, hs in circuit.groups.items()}, dict(circuit.positions))


def slot_share(circuit: Circuit, prompts: PromptSet, n_layers: int, n_heads: int) -> float:
    """The share of (head, position) slots the circuit keeps, over the positions it acts at
    (every head at each position some group acts at), averaged over the prompts."""
    keep = keep_mask(circuit, prompts, n_layers, n_heads)  # layer batch pos head
    at = keep.any(-1).any(0)  # batch pos: positions the circuit acts at
    slots = at.sum(1) * n_layers * n_heads
    used = keep.sum((0, 3)).sum(1)
    share = torch.where(slots > 0, used / slots.clamp(min=1), torch.zeros_like(used, dtype=torch.float))
    return share.float().mean().item()


SCORES = ("full", "circuit", "random", "faithfulness", "slots")


@dataclass(frozen=True)
class Evaluation:
    """A circuit under mean ablation (the columns of Prakash et al.'s Table 1): the metric of the
    full model, of the circuit and, averaged over `n_random` draws, of random circuits of the
    same group sizes and positions; faithfulness = circuit / full; `slots`: the circuit's share
    of the (head, position) slots at its positions (`slot_share`)."""

    full: float
    circuit: float
    random: float
    faithfulness: float
    slots: float
    metric: str = "accuracy"
    n_random: int = 10
    n: int = 0

    def as_row(self) -> dict:
        """The five numbers, rounded to 4 decimals (a table row)."""
        return {k: round(getattr(self, k), 4) for k in SCORES}

    def to_frame(self):
        return frame([{**self.as_row(), "metric": self.metric, "n": self.n}], [*SCORES, "metric", "n"])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Evaluation:
        return cls(**d)

    def __repr__(self) -> str:
        numbers = ", ".join(f"{k}={number(getattr(self, k))}" for k in SCORES)
        return f"Evaluation({numbers}; {self.metric}, n={self.n}, {self.n_random} random circuits)"


def evaluate_circuit(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    reference: PromptSet,
    *,
    metric: Metric = accuracy,
    n_random: int = 10,
    seed: int = 0,
    settings: RunSettings = QUIET,
    means: Float[Tensor, "layer pos head d"] | None = None,
) -> Evaluation:
    """`metric` (default accuracy) of the full model, of the circuit under mean ablation (means
    over `reference`, or the given `means` of it) and of `n_random` random circuits drawn with
    `seed` (evaluated with the circuit in shared forwards); faithfulness = circuit / full."""
    if means is None:
        means = position_means(model, reference, settings=settings)
    quiet = RunSettings(settings.batch_size, settings.max_rows, progress=False)
    full = measure(model, prompts, metric, settings=quiet)
    rng = random.Random(seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    randoms = [random_circuit(circuit, n_layers, n_heads, rng) for _ in range(n_random)]
    circ, *rand = ablated_scores(model, [circuit, *randoms], prompts, means, metric=metric, settings=settings)
    rand_mean = sum(rand) / len(rand) if rand else float("nan")
    slots = slot_share(circuit, prompts, n_layers, n_heads)
    name = metric_name(metric)
    return Evaluation(full, circ, rand_mean, circ / full if full else float("nan"), slots, name, n_random, len(prompts))
