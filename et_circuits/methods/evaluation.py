"""Circuit evaluation by mean ablation (as in the entity-tracking paper's Table 1).

F(C), a circuit's accuracy: every head's `hook_z` at every position is replaced by its
position-wise mean over a reference prompt set, except each group's heads at that group's
positions, which keep their own value. The random baseline draws circuits of the same group
sizes and positions uniformly at random; faithfulness = F(C) / full accuracy. The criteria
built on F (minimality, completeness) are in `minimality`.
"""

from __future__ import annotations

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
from et_circuits.core.errors import CircuitError, DataError
from et_circuits.core.forward import measure
from et_circuits.core.hooks import logits_at, mean_activations, replace_hooks
from et_circuits.core.io import read_tensors, write_tensors
from et_circuits.core.prompts import LAST, PromptSet
from et_circuits.core.restart import clean_run, earliest, run_from, same_start_chunks, tile
from et_circuits.core.settings import QUIET, RunSettings


def keep_mask(circuit: Circuit, prompts: PromptSet, n_layers: int, n_heads: int) -> Bool[Tensor, "layer batch pos head"]:
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
    settings: RunSettings = QUIET,
    cache_dir: str | os.PathLike | None = None,
) -> Float[Tensor, "layer pos head d"]:
    """Position-wise mean of every head's hook_z over the reference prompts (which must be as
    long as the prompts they ablate). With `cache_dir`, the means are kept there as
    `means-<digest>.safetensors`, the digest naming the model's weights, the prompts and the
    batch size, so that stages computing the same means share one computation."""
    if cache_dir is None:
        return mean_activations(model, reference.input_ids, "z", settings.batch_size)
    path = Path(cache_dir) / f"means-{_means_digest(model, reference, settings.batch_size)}.safetensors"
    if path.exists():
        return read_tensors(path)["means"].to(model.cfg.device)
    means = mean_activations(model, reference.input_ids, "z", settings.batch_size)
    write_tensors(path, {"means": means}, {"what": "position_means", "prompts": str(len(reference))})
    return means


def _means_digest(model: HookedTransformer, reference: PromptSet, batch_size: int) -> str:
    """sha256 over a sample of every parameter (each tensor's first 1024 entries), the dtype, the
    prompts' token ids and the batch size (which fixes the summation order)."""
    digest = hashlib.sha256(f"{model.cfg.dtype} {batch_size} {tuple(reference.input_ids.shape)}".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(name.encode())
            digest.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    digest.update(reference.input_ids.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def ablated_accuracy(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    settings: RunSettings = QUIET,
    ablate_circuit: bool = False,
) -> float:
    """F(C): accuracy with every head outside the circuit (or off its group's positions)
    replaced by its position-wise mean. With `ablate_circuit`, the complement: only the
    circuit's heads at their groups' positions are mean-ablated (F(M \\ C))."""
    return ablated_accuracies(model, [circuit], prompts, means, settings, ablate_circuit)[0]


METHODS = ("fast", "reference")


def ablated_accuracies(
    model: HookedTransformer,
    circuits: Sequence[Circuit],
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
    settings: RunSettings = QUIET,
    ablate_circuit: bool = False,
    method: str = "fast",
) -> list[float]:
    """`ablated_accuracy` of several circuits in shared forwards: the prompts repeated once per
    circuit, each row ablated as its circuit asks, at most `settings.max_rows` rows in a pass.
    The two methods agree to rounding (`ablated_last_logits`)."""
    correct = torch.zeros(len(circuits), len(prompts), dtype=torch.bool)
    cpu = prompts.to("cpu")
    for which, row, logits in ablated_last_logits(model, circuits, prompts, means, settings, ablate_circuit, method):
        correct[which, row] = logits.argmax(-1).cpu() == cpu.answers[row]
    return correct.float().mean(1).tolist()


@torch.no_grad()
def ablated_last_logits(
    model: HookedTransformer,
    circuits: Sequence[Circuit],
    prompts: PromptSet,
    means: Float[Tensor, "layer pos head d"],
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
    if method not in METHODS:
        raise CircuitError(f"unknown ablation method {method!r}; expected one of {METHODS}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for circuit in circuits:
        circuit.validate(n_layers, n_heads)
    if means.shape[1] < prompts.seq_len:
        raise DataError(f"the reference prompts ({means.shape[1]} tokens) are shorter than the prompts ({prompts.seq_len})")
    device = model.cfg.device
    means = means.to(device)
    cpu = prompts.to("cpu")
    last = cpu.position(LAST)

    def keep_of(which: Tensor, row: Tensor) -> Tensor:
        keep = torch.cat([keep_mask(circuits[c], cpu[row[which == c]], n_layers, n_heads) for c in which.unique().tolist()], dim=1)
        return (~keep if ablate_circuit else keep).to(device)

    n, count = len(prompts), len(circuits)
    if method == "reference":
        rows = max(1, min(settings.max_rows, settings.batch_size * count))
        for start in range(0, count * n, rows):
            index = torch.arange(start, min(start + rows, count * n))
            which, row = index // n, index % n
            logits = model.run_with_hooks(cpu.input_ids[row].to(device), fwd_hooks=replace_hooks("z", means, keep_of(which, row)))
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
    base = [] if ablate_circuit else replace_hooks("z", means, torch.zeros(n_layers, 1, prompts.seq_len, n_heads, dtype=torch.bool, device=device))
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


@dataclass
class Evaluation:
    """Table 1's columns for one model and circuit; `slots`: the circuit's share of the
    (head, position) slots at its positions (`slot_share`)."""

    full: float
    circuit: float
    random: float
    faithfulness: float
    slots: float

    def as_row(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


def evaluate_circuit(
    model: HookedTransformer,
    circuit: Circuit,
    prompts: PromptSet,
    reference: PromptSet,
    n_random: int = 10,
    seed: int = 0,
    settings: RunSettings = QUIET,
    means: Float[Tensor, "layer pos head d"] | None = None,
) -> Evaluation:
    """Full accuracy, circuit accuracy (means over `reference`, or the given `means` of it),
    mean random-circuit accuracy over `n_random` draws (evaluated with the circuit in shared
    forwards), and faithfulness = circuit / full."""
    if means is None:
        means = position_means(model, reference, settings)
    quiet = RunSettings(settings.batch_size, settings.max_rows, progress=False)
    full = measure(model, prompts, settings=quiet)
    rng = random.Random(seed)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    randoms = [random_circuit(circuit, n_layers, n_heads, rng) for _ in range(n_random)]
    circ, *rand = ablated_accuracies(model, [circuit, *randoms], prompts, means, settings)
    rand_mean = sum(rand) / len(rand) if rand else float("nan")
    slots = slot_share(circuit, prompts, n_layers, n_heads)
    return Evaluation(full, circ, rand_mean, circ / full if full else float("nan"), slots)
