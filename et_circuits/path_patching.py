"""Path patching (Wang et al. 2023) in the paper's four steps, which find the circuit's groups
A-D one after the other.

A step scores every sender head: its `hook_z` at the step's position p takes its value from a
corrupt prompt. In the *frozen run* (clean prompt) every head at positions >= p is frozen to its
clean value except the sender at p; MLPs stay free. Step 1 reads the target's probability at the
last token of that run. Steps 2-4 record the receivers' (previous group's) `hook_q` / `hook_v` at
p from the frozen run and patch them into a fresh clean run (the *receiver run*), whose last
token is read. score = (mean p_patched - mean p_clean) / mean p_clean over the prompts; the most
negative scores are the most important heads.

The paper averages the per-prompt ratio (p_patched - p_clean) / p_clean instead. That is the
same up to weighting every prompt by its p_clean, and it is unbounded: a prompt the model gets
wrong with p_clean ~ 1e-6 (the organism puts ~0 on the answer of every prompt it fails) adds a
ratio of thousands and decides the ranking alone. The ratio of means is bounded below by -1 and
equals the paper's score wherever p_clean is the same across prompts.

Two implementations give the same scores (tested to 1e-5 in fp32):

- `reference`: two full forward passes per sender head, as the authors' code does.
- `fast` (default) uses what the problem allows. In the frozen run every head is frozen, so
  nothing moves between positions: only the residual stream at p changes, and only from the
  sender's layer on. It is a one-position pass starting from the clean `resid_pre` at p (below
  a sender, the frozen run reproduces the clean one). In the receiver run only positions >= p
  and layers from the lowest receiver above the sender can change: it starts there from the
  clean residual stream of those positions, with the clean keys and values of the earlier
  positions as a frozen KV cache. A sender at or above every receiver's layer cannot reach a
  receiver: its score is 0. The senders of a layer share each pass (one batch row per sender
  and prompt), so each pass starts at its senders' layer; prompts are grouped by sender
  position so a group's suffix starts at its p; the clean and corrupt runs are made once for
  all four steps (`prepare`), each corrupt run from its first changed token on.

With grouped-query attention, `hook_v` is made per query head for the duration (TransformerLens'
`ungroup_grouped_query_attention`), so a receiver's value input is its own, not its kv group's.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from . import data
from .circuit import GROUP_POSITIONS, Circuit, CircuitError, Head
from .data import Batch, DataError
from .hooks import at_positions, gather, hook_name, logits_at, override_hooks, patch_hooks, store_hooks
from .io import write_tensors
from .metrics import prefix_cache

METHODS = ("fast", "reference")
PAPER_TOP_K = (20, 5, 10, 5)  # Llama-7B; Goat and FLoat used (50, 20, 30, 5)
TOP_K_CAP = 0.25  # at most this fraction of all heads per step (matters only for small models)
FAST_ROWS = 4096  # default (sender, prompt) rows per forward pass of the fast method


@dataclass(frozen=True)
class Step:
    """One path-patching step: the group it finds, where its senders sit, and what the senders
    are scored through (`None`: the logits; "q" / "v": the previous group's inputs at p)."""

    group: str
    receiver_kind: str | None

    @property
    def position(self) -> str:
        return GROUP_POSITIONS[self.group]


STEPS: tuple[Step, ...] = (
    Step("value_fetcher", None),
    Step("pos_transmitter", "q"),
    Step("pos_detector", "v"),
    Step("struct_reader", "v"),
)


# ---------------------------------------------------------------------------------------------
# Prompts


def prompts(tokenizer, vocab: data.Vocabulary, n: int, n_boxes: int = 7, seed: int = 0) -> tuple[Batch, Batch]:
    """`n` seeded clean prompts and their corruptions (same length, so positions line up)."""
    clean = data.sample_prompts(vocab, n, n_boxes, seed)
    rng = random.Random(f"path-patching-corruption-{seed}")
    corrupt = [data.path_patching_corruption(s, rng, vocab) for s in clean]
    return data.make_batch(tokenizer, clean), data.make_batch(tokenizer, corrupt)


def _check_pair(clean: Batch, corrupt: Batch) -> None:
    if len(clean) != len(corrupt) or clean.input_ids.shape != corrupt.input_ids.shape:
        raise DataError("clean and corrupt prompts must come in pairs of equal length")
    for name in ("last", "query_label"):
        if not torch.equal(clean.position(name), corrupt.position(name)):
            raise DataError(f"clean and corrupt prompts disagree on the {name} position")


def _select(batch: Batch, index: Int[Tensor, " n"]) -> Batch:
    """The prompts of `batch` at `index`, in that order."""
    return Batch([batch.samples[i] for i in index.tolist()], *(getattr(batch, n)[index] for n in Batch._TENSORS))


# ---------------------------------------------------------------------------------------------
# Helpers shared by both methods


@contextmanager
def per_head_values(model: HookedTransformer):
    """Make `hook_k` / `hook_v` per query head while inside (a no-op without GQA)."""
    grouped = model.cfg.n_key_value_heads is not None and not model.cfg.ungroup_grouped_query_attention
    if grouped:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        if grouped:
            model.set_ungroup_grouped_query_attention(False)


def _target_prob(logits: Float[Tensor, "batch vocab"], target: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.gather(-1, target.to(probs.device)[:, None])[:, 0]


def _mask(heads: Sequence[Head], n_layers: int, n_heads: int) -> Bool[Tensor, "layer head"]:
    m = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise CircuitError(f"head L{layer}H{head} is outside the model ({n_layers} x {n_heads})")
        m[layer, head] = True
    return m


# ---------------------------------------------------------------------------------------------
# Reference: two full forward passes per sender


@torch.no_grad()
def _reference_chunk(
    model: HookedTransformer,
    clean: Batch,
    corrupt: Batch,
    step: Step,
    receivers: Bool[Tensor, "layer head"],
    senders: Bool[Tensor, "layer head"],
) -> tuple[Float[Tensor, "layer head batch"], Float[Tensor, " batch"]]:
    """p_patched - p_clean of every sender on one chunk (NaN for non-senders), and p_clean.

    Per sender: the frozen run on the whole prompt (stopped after the last receiver's layer
    when there are receivers), then the receiver run on the whole prompt."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    pos, ids = clean.position(step.position), clean.input_ids
    z_names = [hook_name("z", layer) for layer in range(n_layers)]
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n in z_names)
    p_clean = _target_prob(logits_at(logits, clean.last), clean.answer)
    clean_z = {layer: cache[hook_name("z", layer)] for layer in range(n_layers)}
    del cache
    corrupt_z = gather(model, corrupt.input_ids, "z", pos)
    rows = torch.arange(len(clean), device=ids.device)
    seq = torch.arange(ids.shape[1], device=ids.device)
    before = (seq[None, :] < pos[:, None])[:, :, None].expand(-1, -1, n_heads)  # batch pos head
    keep = {layer: before for layer in range(n_layers)}
    receiver_layers = sorted(set(receivers.nonzero()[:, 0].tolist()))

    out = torch.full((n_layers, n_heads, len(clean)), float("nan"))
    for layer, head in senders.nonzero().tolist():
        values = dict(clean_z)
        values[layer] = clean_z[layer].clone()
        values[layer][rows, pos, head] = corrupt_z[layer][:, head]
        frozen = override_hooks("z", values, keep)
        if step.receiver_kind is None:
            logits = model.run_with_hooks(ids, fwd_hooks=frozen)
        else:
            recorded = gather(model, ids, step.receiver_kind, pos, receiver_layers, fwd_hooks=frozen)
            logits = model.run_with_hooks(ids, fwd_hooks=patch_hooks(step.receiver_kind, recorded, pos, receivers))
        p = _target_prob(logits_at(logits, clean.last), clean.answer)
        out[layer, head] = (p - p_clean).cpu()
    return out, p_clean.cpu()


# ---------------------------------------------------------------------------------------------
# Fast: one-position frozen runs, suffix receiver runs, many senders per pass


SENDER_POSITIONS = ("last", "query_label", "prev_query_label")


@dataclass
class CleanRuns:
    """What the fast method starts from, computed once for all four steps (`prepare`): every
    layer's clean `resid_pre`, keys and values at all positions, every head's clean and corrupt
    `hook_z` at the three sender positions, and the clean probability of the target.

    Kept in host memory (at 7B geometry and 300 prompts they take ~13 GB in bf16, as much as
    the model): each chunk of prompts is moved to the model's device when a step reaches it."""

    resid: list[Float[Tensor, "batch seq d_model"]]
    keys: list[Float[Tensor, "batch seq head d_head"]]
    values: list[Float[Tensor, "batch seq head d_head"]]
    clean_z: dict[str, list[Float[Tensor, "batch head d_head"]]]
    corrupt_z: dict[str, list[Float[Tensor, "batch head d_head"]]]
    p_clean: Float[Tensor, " batch"]

    def take(self, index: Int[Tensor, " n"], device: torch.device | str) -> "CleanRuns":
        """The rows of some prompts, on `device`."""
        index = index.to(self.p_clean.device)
        pick = lambda ts: [t[index].to(device) for t in ts]  # noqa: E731
        return CleanRuns(
            pick(self.resid),
            pick(self.keys),
            pick(self.values),
            {k: pick(v) for k, v in self.clean_z.items()},
            {k: pick(v) for k, v in self.corrupt_z.items()},
            self.p_clean[index].to(device),
        )


@torch.no_grad()
def prepare(
    model: HookedTransformer, clean: Batch, corrupt: Batch, batch_size: int = 32, progress: bool = True
) -> CleanRuns:
    """Run the clean prompts once and keep what every fast step needs; then run each corrupt
    prompt from its first changed token only, attending to the clean prefix's keys and values
    (the corruption starts at the previous query label, so on average half of a corrupt
    prompt is its clean one)."""
    _check_pair(clean, corrupt)
    n_layers, device = model.cfg.n_layers, model.cfg.device
    layers = range(n_layers)
    kept = {f"blocks.{layer}.hook_resid_pre" for layer in layers}
    kept |= {hook_name(k, layer) for k in ("k", "v", "z") for layer in layers}
    z_names = {hook_name("z", layer) for layer in layers}
    chunks: list[dict[str, list[Tensor]]] = []  # per chunk: name -> tensors
    with per_head_values(model):
        parts = list(clean.chunks(batch_size))
        for c in tqdm(parts, desc="path patching: clean runs", disable=not progress, leave=False):
            c = c.to(device)
            logits, cache = model.run_with_cache(c.input_ids, names_filter=lambda n: n in kept)
            chunk = {
                "resid": [cache[f"blocks.{layer}.hook_resid_pre"] for layer in layers],
                "keys": [cache[hook_name("k", layer)] for layer in layers],
                "values": [cache[hook_name("v", layer)] for layer in layers],
                "p_clean": [_target_prob(logits_at(logits, c.last), c.answer)],
            }
            for where in SENDER_POSITIONS:
                chunk[where] = [at_positions(cache[hook_name("z", layer)], c.position(where)) for layer in layers]
            chunks.append({name: [t.cpu() for t in ts] for name, ts in chunk.items()})
            del cache, logits
        joined = {name: [torch.cat(ts) for ts in zip(*(c[name] for c in chunks))] for name in chunks[0]}
        del chunks
        runs = CleanRuns(
            joined["resid"],
            joined["keys"],
            joined["values"],
            {where: joined[where] for where in SENDER_POSITIONS},
            {where: [torch.empty_like(z) for z in joined[where]] for where in SENDER_POSITIONS},
            joined["p_clean"][0],
        )
        start = _first_change(clean, corrupt)
        parts = _same_position_chunks(start, batch_size)
        for index in tqdm(parts, desc="path patching: corrupt runs", disable=not progress, leave=False):
            s = int(start[index[0]])
            keys, values = ([t[index, :s].to(device) for t in ts] for ts in (runs.keys, runs.values))
            prefix = prefix_cache(keys, values, s, 0, n_layers)
            embedded = model.embed(corrupt.input_ids[index, s:].to(device))  # LLaMA: resid_pre of layer 0
            _, cache = model.run_with_cache(
                embedded, start_at_layer=0, past_kv_cache=prefix, names_filter=lambda n: n in z_names
            )
            for where in SENDER_POSITIONS:
                at = clean.position(where)[index] - s
                for layer in layers:
                    runs.corrupt_z[where][layer][index] = at_positions(cache[hook_name("z", layer)], at).cpu()
            del cache
    return runs


def _first_change(clean: Batch, corrupt: Batch) -> Int[Tensor, " batch"]:
    """Where each corrupt run starts: its first token that differs from the clean prompt, or
    the earliest sender position if that comes first (corrupt heads are read there)."""
    differs = clean.input_ids != corrupt.input_ids
    first = torch.where(differs.any(1), differs.int().argmax(1), differs.shape[1])
    for where in SENDER_POSITIONS:
        first = torch.minimum(first, clean.position(where))
    return first


def _same_position_chunks(pos: Int[Tensor, " batch"], size: int) -> list[Int[Tensor, " n"]]:
    """Prompt indices in chunks of at most `size` that share a start position, so a chunk's
    suffix run (a receiver run, a corrupt run) starts right there (a few chunks: one per box)."""
    chunks = []
    for value in torch.unique(pos).tolist():
        chunks += list((pos == value).nonzero()[:, 0].split(size))
    return chunks


def _tile(t: Tensor, reps: int) -> Tensor:
    return t.repeat(reps, *([1] * (t.ndim - 1)))


@torch.no_grad()
def _fast_chunk(
    model: HookedTransformer,
    runs: CleanRuns,
    clean: Batch,
    step: Step,
    receivers: Bool[Tensor, "layer head"],
    senders: Bool[Tensor, "layer head"],
    sender_batch: int,
) -> Float[Tensor, "layer head batch"]:
    """p_patched - p_clean as `_reference_chunk` (p_clean is in `runs`), computed with the
    shortcuts in the module doc from this chunk's `runs`; up to `sender_batch` senders of one
    layer share a forward."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    kind, n = step.receiver_kind, len(clean)
    pos, last = clean.position(step.position), clean.last
    clean_z, corrupt_z = runs.clean_z[step.position], runs.corrupt_z[step.position]
    rows = torch.arange(n, device=pos.device)
    receiver_layers = sorted(set(receivers.nonzero()[:, 0].tolist()))

    out = torch.full((n_layers, n_heads, n), float("nan"))
    todo = [tuple(h) for h in senders.nonzero().tolist()]  # sorted by layer, then head
    if kind is not None:  # a sender at or above every receiver cannot reach one
        for layer, head in todo:
            if layer >= receiver_layers[-1]:
                out[layer, head] = 0.0
        todo = [(layer, head) for layer, head in todo if layer < receiver_layers[-1]]
    by_layer: dict[int, list[Head]] = {}
    for layer, head in todo:
        by_layer.setdefault(layer, []).append((layer, head))
    groups = [heads[i : i + sender_batch] for heads in by_layer.values() for i in range(0, len(heads), sender_batch)]
    for group in groups:
        reps, first = len(group), group[0][0]
        stop = n_layers if kind is None else receiver_layers[-1] + 1
        # Frozen run at p only, from the senders' layer: every head clean, except each row's
        # sender, corrupt.
        frozen = {m: _tile(clean_z[m], reps).view(reps, n, n_heads, -1) for m in range(first, stop)}
        for r, (layer, head) in enumerate(group):
            frozen[layer][r, :, head] = corrupt_z[layer][:, head]
        frozen = {m: v.view(reps * n, 1, n_heads, -1) for m, v in frozen.items()}
        x = _tile(runs.resid[first][rows, pos], reps)[:, None]  # rows 1 d_model
        if kind is None:
            logits = model.run_with_hooks(x, start_at_layer=first, fwd_hooks=override_hooks("z", frozen))[:, 0]
        else:
            above = [m for m in receiver_layers if m > first]
            recorded: dict[int, Tensor] = {}
            at_p = torch.zeros(reps * n, dtype=torch.long, device=pos.device)
            model.run_with_hooks(
                x,
                start_at_layer=first,
                stop_at_layer=stop,
                fwd_hooks=[*override_hooks("z", frozen), *store_hooks(kind, at_p, above, recorded)],
            )
            # Receiver run: positions start..end, from the lowest receiver above the senders.
            start, end = int(pos.min()), int(last.max()) + 1
            logits = model.run_with_hooks(
                _tile(runs.resid[above[0]][:, start:end], reps),
                start_at_layer=above[0],
                past_kv_cache=prefix_cache(runs.keys, runs.values, start, above[0], n_layers),
                fwd_hooks=patch_hooks(kind, recorded, _tile(pos - start, reps), receivers),
            )
            logits = logits_at(logits, _tile(last - start, reps))
        p = _target_prob(logits, _tile(clean.answer, reps)).view(reps, n)
        change = (p - runs.p_clean).cpu()
        for r, (layer, head) in enumerate(group):
            out[layer, head] = change[r]
    return out


# ---------------------------------------------------------------------------------------------
# Public API


def step_scores(
    model: HookedTransformer,
    clean: Batch,
    corrupt: Batch,
    step: Step,
    receivers: Sequence[Head] = (),
    method: str = "fast",
    senders: Sequence[Head] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    max_rows: int = FAST_ROWS,
    runs: CleanRuns | None = None,
) -> Float[Tensor, "layer head"]:
    """Path-patching score of every sender head (all heads unless `senders` is given; the
    others are NaN) for one step, on CPU in float32.

    `receivers` are the previous group's heads (empty for step 1). `batch_size` is the number
    of prompts per plain forward (the reference's passes, the fast method's clean and corrupt
    runs); the fast method's own passes take up to `max_rows` (sender, prompt) rows each. It
    starts from `runs` (`prepare`; made here if not given: pass it to share it between steps).
    """
    if method not in METHODS:
        raise CircuitError(f"unknown path-patching method {method!r}; expected one of {METHODS}")
    if (step.receiver_kind is None) != (not receivers):
        need = "no receivers" if step.receiver_kind is None else "receivers (the previous group)"
        raise CircuitError(f"step {step.group} takes {need}")
    if batch_size <= 0 or max_rows <= 0:
        raise CircuitError(f"batch size and rows must be positive, got {batch_size} and {max_rows}")
    _check_pair(clean, corrupt)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    receiver_mask = _mask(receivers, n_layers, n_heads)
    if senders is None:
        sender_mask = torch.ones(n_layers, n_heads, dtype=torch.bool)
    else:
        sender_mask = _mask(senders, n_layers, n_heads)
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)  # sum of p_patched - p_clean
    total_clean = torch.zeros((), dtype=torch.float64)  # sum of p_clean
    device = model.cfg.device
    desc = f"path patching {step.group} ({method})"
    with per_head_values(model):
        if method == "reference":
            chunks = list(zip(clean.chunks(batch_size), corrupt.chunks(batch_size)))
            for c, k in tqdm(chunks, desc=desc, disable=not progress, leave=False):
                c, k = c.to(device), k.to(device)
                change, p_clean = _reference_chunk(model, c, k, step, receiver_mask.to(device), sender_mask)
                total += change.double().sum(-1)
                total_clean += p_clean.double().sum()
        else:
            runs = runs if runs is not None else prepare(model, clean, corrupt, batch_size, progress)
            if runs.p_clean.shape[0] != len(clean):
                raise CircuitError(f"the prepared runs hold {runs.p_clean.shape[0]} prompts, not {len(clean)}")
            sender_batch = max(1, min(int(sender_mask.sum(1).max()), max_rows))
            chunks = _same_position_chunks(clean.position(step.position), max(1, max_rows // sender_batch))
            for index in tqdm(chunks, desc=desc, disable=not progress, leave=False):
                chunk = _select(clean, index).to(device)
                change = _fast_chunk(
                    model, runs.take(index, device), chunk, step, receiver_mask.to(device), sender_mask, sender_batch
                )
                total += change.double().sum(-1)
            total_clean += runs.p_clean.double().sum().cpu()
    return (total / total_clean).float()


def top_heads(scores: Float[Tensor, "layer head"], k: int) -> list[Head]:
    """The `k` heads with the most negative scores (ties: lower layer, then lower head)."""
    flat = scores.flatten().nan_to_num(nan=float("inf"))
    order = torch.sort(flat, stable=True).indices[:k].tolist()
    n_heads = scores.shape[1]
    return [(i // n_heads, i % n_heads) for i in order]


def effective_top_k(top_k: Sequence[int], n_layers: int, n_heads: int, cap: float = TOP_K_CAP) -> tuple[int, ...]:
    """`top_k` capped to `cap` of all heads (at least 1): the paper's 20/5/10/5 out of 1024 heads
    would take most of a 16-head model, so small models keep at most a quarter per step."""
    if len(top_k) != len(STEPS) or any(k <= 0 for k in top_k):
        raise CircuitError(f"top-k needs {len(STEPS)} positive numbers, got {list(top_k)}")
    if not 0 < cap <= 1:
        raise CircuitError(f"top-k cap must be in (0, 1], got {cap}")
    limit = max(1, int(cap * n_layers * n_heads))
    return tuple(min(k, limit) for k in top_k)


def _metadata_matches(path: Path, expected: dict[str, str]) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
    except Exception:
        return False  # unreadable or partial: recompute
    return all(found.get(k) == v for k, v in expected.items())


def load_scores(path: str | Path) -> tuple[Float[Tensor, "layer head"], dict[str, str]]:
    """A saved step's scores and metadata (seed, n, method, receivers, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("scores"), dict(f.metadata() or {})
    except FileNotFoundError:
        raise CircuitError(f"no path-patching scores at {path}") from None
    except Exception as e:
        raise CircuitError(f"{path} is not a path-patching score file: {e}") from None


def run_steps(
    model: HookedTransformer,
    clean: Batch,
    corrupt: Batch,
    top_k: Sequence[int] = PAPER_TOP_K,
    method: str = "fast",
    batch_size: int = 32,
    out_dir: str | Path | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
    on_step: Callable[[Step, bool, float], None] | None = None,
    max_rows: int = FAST_ROWS,
) -> dict[str, Float[Tensor, "layer head"]]:
    """The four steps in order; the receivers of each are the top-k heads of the one before.

    With `out_dir`, each step's scores go to `<out_dir>/<group>.safetensors` (atomically) with
    `metadata`, the method and the receivers; a step whose file is there with the same metadata
    is read back instead of recomputed, so an interrupted run resumes. `on_step(step, reused,
    seconds)` is called after each step. `max_rows`: as in `step_scores` (it does not change
    the scores, so it is not part of the metadata).
    """
    scores: dict[str, Tensor] = {}
    receivers: list[Head] = []
    runs = None  # the fast method's clean and corrupt runs, shared by the steps computed
    for i, step in enumerate(STEPS):
        meta = {**(metadata or {}), "group": step.group, "method": method, "receivers": str(receivers)}
        path = Path(out_dir) / f"{step.group}.safetensors" if out_dir is not None else None
        t0 = time.perf_counter()
        reused = path is not None and path.exists() and _metadata_matches(path, meta)
        if reused:
            scores[step.group] = load_scores(path)[0]
        else:
            if method == "fast" and runs is None:
                runs = prepare(model, clean, corrupt, batch_size, progress)
            scores[step.group] = step_scores(
                model, clean, corrupt, step, receivers, method,
                batch_size=batch_size, progress=progress, max_rows=max_rows, runs=runs,
            )
            if path is not None:
                write_tensors(path, {"scores": scores[step.group]}, meta)
        if on_step is not None:
            on_step(step, reused, time.perf_counter() - t0)
        receivers = top_heads(scores[step.group], top_k[i])
    return scores


def circuit_from_scores(scores: dict[str, Float[Tensor, "layer head"]], top_k: Sequence[int]) -> Circuit:
    """Each group = the top-k heads of its step (before minimality)."""
    return Circuit({step.group: top_heads(scores[step.group], k) for step, k in zip(STEPS, top_k)})
