"""The three fine-tunes of the base: their recipe, their tasks (variable binding for Goat and
FLoat, the general mix for Vicuna), the LoRA wrapper (Goat), the fine-tuning loop and the job
that runs one fine-tune in its own process and saves it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data
from ..data import Vocabulary
from .corpus import (
    N_SELECT,
    SELECT_SEED,
    Encoder,
    Piece,
    general_facts,
    general_passage,
    organism_tokenizer,
    program_passage,
    prompt_set,
)
from .loop import Arch, Opt, example_accuracy, new_model, optimizer, prompt_accuracy, save_model, train_step
from .search import from_bytes

Task = Callable[[random.Random], list[Piece]]


@dataclass(frozen=True)
class FinetuneRecipe:
    steps: int = 400  # Goat and FLoat
    general_steps: int = 800  # Vicuna: a gentler, longer fine-tune, like a chat model's
    seed: int = 1
    full_opt: Opt = Opt(lr=3e-4, warmup=30)  # FLoat (all weights)
    lora_opt: Opt = Opt(lr=3e-3, warmup=30)  # Goat (LoRA: the usual 10x)
    general_opt: Opt = Opt(lr=1e-4, warmup=30)  # Vicuna (all weights)
    lora_r: int = 8
    lora_alpha: int = 16
    max_vars: int = 12  # variables per program (the box task's prompts have 7 boxes)
    max_statements: int = 4


def program_task(vocab: Vocabulary, max_vars: int) -> Task:
    """Variable binding with 2..max_vars variables (Goat's and FLoat's fine-tuning data)."""
    return lambda rng: program_passage(rng, vocab, rng.randint(2, max_vars))


def general_task(max_statements: int) -> Task:
    """The general mix, 1..max_statements statements per passage (Vicuna's fine-tuning data)."""
    facts = general_facts()
    return lambda rng: general_passage(rng, rng.randint(1, max_statements), facts)


def task_for(name: str, recipe: FinetuneRecipe, vocab: Vocabulary) -> Task:
    if name == "organism-vicuna":
        return general_task(recipe.max_statements)
    return program_task(vocab, recipe.max_vars)


def lora(model, recipe: FinetuneRecipe):
    """Wrap `model` in a PEFT LoRA on the attention projections (as Goat-7B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed)
    config = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    return get_peft_model(model, config)


def finetune(
    model,
    tok,
    task: Task,
    opt: Opt,
    steps: int,
    seed: int,
    probe: Callable[[], dict],
    desc: str = "fine-tune",
    position: int = 0,
    probe_every: int = 50,
) -> tuple[list[dict], float]:
    """Train `model`'s trainable parameters on `task` (answer tokens only), cosine schedule."""
    enc, pad = Encoder(tok), tok.pad_token_id
    rng = random.Random(1_000_003 * seed + 29)
    torch.manual_seed(seed)
    model.train()
    adam, sched, params = optimizer(model.parameters(), opt, total=steps)
    history, start = [dict(step=0, **probe())], time.process_time()
    for step in tqdm(range(1, steps + 1), desc=desc, position=position, leave=False):
        loss = train_step(model, adam, sched, params, [enc(task(rng)) for _ in range(opt.batch)], pad, opt.clip)
        if step % probe_every == 0 or step == steps:
            history.append(dict(step=step, loss=loss, **probe()))
    model.eval()
    return history, time.process_time() - start


def _finetune_job(name: str, base_state: bytes, arch: Arch, recipe: FinetuneRecipe, out: Path, position: int) -> dict:
    """Fine-tune one model in its own process (one thread) and save it under `out / name`."""
    torch.set_num_threads(1)
    tok = organism_tokenizer()
    vocab = data.vocabulary(tok)
    model = new_model(arch, tok, recipe.seed)
    model.load_state_dict(from_bytes(base_state))
    use_lora = name == "organism-goat"
    if use_lora:
        model = lora(model, recipe)
    task = task_for(name, recipe, vocab)
    select = prompt_set(tok, vocab, N_SELECT, 7, SELECT_SEED)
    held = [Encoder(tok)(task(random.Random(10_000 + i))) for i in range(200)]

    def probe() -> dict:
        return dict(acc7=prompt_accuracy(model, select), task=example_accuracy(model, held, tok.pad_token_id))

    if name == "organism-vicuna":
        opt, steps = recipe.general_opt, recipe.general_steps
    else:
        opt, steps = (recipe.lora_opt if use_lora else recipe.full_opt), recipe.steps
    history, cpu_s = finetune(model, tok, task, opt, steps, recipe.seed, probe, name, position)
    save_model(model, tok, out / name)
    return dict(steps=steps, cpu_s=round(cpu_s, 1), history=history)
