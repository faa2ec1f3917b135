"""Train the model organism: a small LLaMA base and its three fine-tunes, mirroring the paper's
Llama-7B, Vicuna-7B, Goat-7B and FLoat-7B.

Run as `python -m et_circuits.tasks.entity_tracking.organism.train` (`make organism`). Every stage is seeded; the four
models, their tokenizer, the training log and the model card (README.md) are rewritten under
`weights/`.

- organism-llama: trained from scratch on entity-tracking passages in the paper's format (every
  box queried after the context, loss on the answers only) with a curriculum over the number of
  boxes that stops early, at 3 boxes, and then consolidates there: the 7-box prompt is solved
  only as far as the mechanism generalises, which leaves room for fine-tuning. Seeds are tried
  two at a time (one process each); a stalled plateau is abandoned for the next pair.
- organism-vicuna: full fine-tune on a general mix of statements (days, seasons, colours).
- organism-goat: LoRA (q/k/v/o) fine-tune on variable binding in a tiny programming language,
  saved as a PEFT adapter on top of organism-llama.
- organism-float: the same variable-binding fine-tune on all weights.

The code: `corpus` (tokenizer, passages, prompt sets), `loop` (model, optimiser, train step),
`search` (the base and its seed search), `finetune` (the three fine-tunes), `card` (evaluation
and the model card); this module runs the family from the command line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine

import argparse
import json
import multiprocessing as mp
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .card import NAMES, evaluate_family, model_card, n_params
from .corpus import organism_tokenizer
from .finetune import FinetuneRecipe, _finetune_job, general_task, program_task
from .loop import Arch, new_model, save_model
from .search import BaseRecipe, search_base, to_bytes, train_base

__all__ = [  # this module's own names and those its callers reach as `train.X`
    "WEIGHTS",
    "main",
    "train_family",
    "cpu_seconds",
    "replace_dir",
    "Arch",
    "BaseRecipe",
    "FinetuneRecipe",
    "NAMES",
    "_finetune_job",
    "evaluate_family",
    "general_task",
    "model_card",
    "n_params",
    "new_model",
    "organism_tokenizer",
    "program_task",
    "save_model",
    "search_base",
    "to_bytes",
    "train_base",
]

WEIGHTS = Path(__file__).parent / "weights"


# ---------------------------------------------------------------------------------------------
# The whole family


def train_family(
    base_recipe: BaseRecipe, ft_recipe: FinetuneRecipe, out: Path, first_seed: int, rounds: int, log=print
) -> dict:
    """Train the base and its three fine-tunes, save them under `out`, return the record."""
    log("training organism-llama (two seeds at a time)")
    run, step, attempts = search_base(base_recipe, first_seed, rounds, log)
    tok = organism_tokenizer()
    base = new_model(base_recipe.arch, tok, run.seed)
    base.load_state_dict(run.checkpoints[step])
    save_model(base.eval(), tok, out / "organism-llama")
    acc7 = next(h["acc7"] for h in run.history if h["step"] == step)
    log(f"organism-llama: seed {run.seed}, step {step}, selection accuracy {acc7:.3f}")
    record = dict(
        base_recipe=asdict(base_recipe),
        finetune_recipe=asdict(ft_recipe),
        attempts=attempts,
        finetunes={},
        base=dict(seed=run.seed, step=step, acc7=acc7, history=run.history),
    )
    state = to_bytes(base.state_dict())
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        jobs = {
            name: pool.submit(_finetune_job, name, state, base_recipe.arch, ft_recipe, out, i % 2)
            for i, name in enumerate(NAMES[1:])
        }
        for name, job in jobs.items():
            record["finetunes"][name] = job.result()
            h = record["finetunes"][name]["history"][-1]
            log(f"{name}: selection accuracy {h['acc7']:.3f}, task accuracy {h['task']:.3f}")
    return record


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes."""
    import resource

    return sum(
        ru.ru_utime + ru.ru_stime
        for ru in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def replace_dir(new: Path, old: Path) -> None:
    """Swap `new` in for `old` (the previous contents are removed)."""
    if old.exists():
        shutil.rmtree(old)
    new.rename(old)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="directory to (re)write")
    parser.add_argument("--seed", type=int, default=0, help="first base seed")
    parser.add_argument("--rounds", type=int, default=4, help="pairs of base seeds to try at most")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    wall = time.perf_counter()
    tmp = args.out.with_name(args.out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    record = train_family(BaseRecipe(), FinetuneRecipe(), tmp, args.seed, args.rounds, tqdm.write)
    tqdm.write("evaluating on the 500 held-out 7-box prompts (seed 0)")
    record["accuracy"] = evaluate_family(tmp)
    record.update(
        wall_s=time.perf_counter() - wall,
        cpu_s=cpu_seconds(),
        n_params=n_params(tmp / "organism-llama"),
        vocab_size=len(organism_tokenizer()),
        host_cpus=os.cpu_count(),
    )
    (tmp / "README.md").write_text(model_card(record))
    (tmp / "training_log.json").write_text(json.dumps(record, indent=1))
    replace_dir(tmp, args.out)
    for name, value in record["accuracy"].items():
        tqdm.write(f"{name}: 7-box accuracy {value:.3f}")
    tqdm.write(f"wrote {args.out} in {record['wall_s'] / 60:.1f} min ({record['cpu_s'] / 60:.1f} CPU min)")


if __name__ == "__main__":
    main()
