"""The base model, organism-llama: its recipe, one curriculum run over the number of boxes
(`train_base`), the choice of its checkpoint (`select_base`), and the search over seeds, two at
a time, one process each (`search_base`). The runs travel between processes as bytes
(`to_bytes`, `from_bytes`).
"""

from __future__ import annotations

import copy
import io
import multiprocessing as mp
import queue as queue_lib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import data
from ..data import Vocabulary
from .corpus import N_SELECT, SELECT_SEED, Encoder, Piece, box_passage, organism_tokenizer, prompt_set
from .loop import Arch, Opt, new_model, optimizer, prompt_accuracy, train_step

# ---------------------------------------------------------------------------------------------
# The base: curriculum over the number of boxes, stopped early and consolidated


@dataclass(frozen=True)
class BaseRecipe:
    arch: Arch = Arch()
    opt: Opt = Opt(lr=3e-3)
    promote: float = 0.9  # held-out first-query accuracy at the level that moves the curriculum up
    cap: int = 3  # the curriculum stops at this many boxes ...
    consolidate: int = 800  # ... and trains there this many more steps
    stall: tuple[int, ...] = (2500, 2000)  # steps without promotion that mean a stalled plateau
    eval_every: int = 25
    target: float = 0.66  # Llama-7B's accuracy in the paper
    window: tuple[float, float] = (0.5, 0.8)


@dataclass
class BaseRun:
    """One curriculum run: its evaluations and the checkpoints of its consolidation phase."""

    seed: int
    history: list[dict] = field(default_factory=list)
    checkpoints: dict[int, dict] = field(default_factory=dict)
    capped_at: int | None = None  # step at which the cap level reached `promote`
    outcome: str = "running"  # "done", "stalled" or "aborted"
    cpu_s: float = 0.0


def box_batch(rng: random.Random, vocab: Vocabulary, level: int, size: int) -> list[list[Piece]]:
    """Half the passages at the current level, the rest uniform over 2..level boxes."""
    return [box_passage(rng, vocab, level if rng.random() < 0.5 else rng.randint(2, level)) for _ in range(size)]


def train_base(
    recipe: BaseRecipe,
    seed: int,
    abort: Callable[[int], bool] = lambda step: False,
    position: int = 0,
) -> BaseRun:
    """Curriculum from 2 boxes up to `recipe.cap`, then `recipe.consolidate` steps at the cap.
    At every evaluation `abort(k)` is asked, k being the step that reached the cap (or the
    current step before then): the search stops runs that can no longer win."""
    tok = organism_tokenizer()
    vocab = data.vocabulary(tok)
    enc, pad = Encoder(tok), tok.pad_token_id
    checks = {n: prompt_set(tok, vocab, 200, n, SELECT_SEED + n) for n in range(2, recipe.cap + 1)}
    select = prompt_set(tok, vocab, N_SELECT, 7, SELECT_SEED)
    model = new_model(recipe.arch, tok, seed).train()
    adam, sched, params = optimizer(model.parameters(), recipe.opt)
    rng = random.Random(1_000_003 * seed + 17)  # the training stream, apart from all held-out sets
    run, level, since, start = BaseRun(seed), 2, 0, time.process_time()
    max_steps = sum(recipe.stall) * (recipe.cap - 1) + recipe.consolidate
    bar = tqdm(total=max_steps, desc=f"base seed {seed}", position=position, leave=False)
    for step in range(1, max_steps + 1):
        examples = [enc(p) for p in box_batch(rng, vocab, level, recipe.opt.batch)]
        loss = train_step(model, adam, sched, params, examples, pad, recipe.opt.clip)
        bar.update()
        if step % recipe.eval_every:
            continue
        acc = prompt_accuracy(model, checks[level])
        acc7 = prompt_accuracy(model, select)
        run.history.append(dict(step=step, level=level, acc_level=acc, acc7=acc7, loss=loss))
        bar.set_postfix(boxes=level, acc=f"{acc:.2f}", acc7=f"{acc7:.2f}")
        if run.capped_at is not None:
            run.checkpoints[step] = copy.deepcopy(model.state_dict())
            if step - run.capped_at >= recipe.consolidate:
                run.outcome = "done"
                break
        elif acc >= recipe.promote and level == recipe.cap:
            run.capped_at = step
            run.checkpoints[step] = copy.deepcopy(model.state_dict())
        elif acc >= recipe.promote:
            level, since = level + 1, step
        elif step - since > recipe.stall[min(level - 2, len(recipe.stall) - 1)]:
            run.outcome = "stalled"
            break
        if abort(step if run.capped_at is None else run.capped_at):
            run.outcome = "aborted"
            break
    bar.close()
    run.cpu_s = time.process_time() - start
    return run


def select_base(run: BaseRun, recipe: BaseRecipe) -> int | None:
    """The consolidation checkpoint (second half) whose 7-box selection accuracy is closest to
    the target inside the window; None when none is inside."""
    half = run.capped_at + recipe.consolidate // 2
    inside = [
        h
        for h in run.history
        if h["step"] >= half and h["step"] in run.checkpoints and recipe.window[0] <= h["acc7"] <= recipe.window[1]
    ]
    if not inside:
        return None
    return min(inside, key=lambda h: (abs(h["acc7"] - recipe.target), -h["step"]))["step"]


def to_bytes(obj) -> bytes:
    """Tensors travel between processes as bytes (no shared file descriptors to outlive)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=False)


def _base_worker(recipe: BaseRecipe, seed: int, position: int, limit, results) -> None:
    """One seed in its own process (one thread); reports its run, with the chosen checkpoint."""
    torch.set_num_threads(1)
    run = train_base(recipe, seed, abort=lambda step: step > limit.value, position=position)
    chosen = select_base(run, recipe) if run.outcome == "done" else None
    run.checkpoints = {chosen: run.checkpoints[chosen]} if chosen is not None else {}
    results.put(to_bytes((seed, run, chosen)))


def search_base(recipe: BaseRecipe, first_seed: int, rounds: int, log=print) -> tuple[BaseRun, int, list]:
    """Try seeds two at a time, one process each. The winner is the usable run that reached the
    cap in the fewest steps (ties: the lower seed), so the choice does not depend on timing: once
    a run is usable, the other is stopped only when it cannot have reached the cap sooner."""
    ctx = mp.get_context("spawn")
    attempts = []
    for r in range(rounds):
        seeds = [first_seed + 2 * r, first_seed + 2 * r + 1]
        limits = {s: ctx.Value("i", 10**9) for s in seeds}
        results = ctx.Queue()
        procs = [ctx.Process(target=_base_worker, args=(recipe, s, i, limits[s], results)) for i, s in enumerate(seeds)]
        for p in procs:
            p.start()
        runs = {}
        while len(runs) < len(seeds):
            try:
                seed, run, chosen = from_bytes(results.get(timeout=5))
            except queue_lib.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError("a base training process died") from None
                continue
            runs[seed] = (run, chosen)
            attempts.append(
                dict(
                    seed=seed,
                    outcome=run.outcome,
                    capped_at=run.capped_at,
                    steps=run.history[-1]["step"] if run.history else 0,
                    chosen=chosen,
                    cpu_s=round(run.cpu_s, 1),
                )
            )
            log(f"base seed {seed}: {run.outcome}, cap reached at step {run.capped_at}, checkpoint {chosen}")
            if chosen is not None:
                for other in seeds:
                    if other != seed:
                        limits[other].value = min(limits[other].value, run.capped_at)
        for p in procs:
            p.join()
        usable = [(run.capped_at, seed) for seed, (run, chosen) in runs.items() if chosen is not None]
        if usable:
            _, seed = min(usable)
            run, chosen = runs[seed]
            return run, chosen, attempts
    raise RuntimeError(f"no usable base in {2 * rounds} seeds; see the attempts: {attempts}")
