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
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine

import argparse
import copy
import io
import json
import math
import multiprocessing as mp
import queue as queue_lib
import random
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from et_circuits.core.errors import DataError
from et_circuits.core.hooks import logits_at
from et_circuits.core.metrics import n_correct
from et_circuits.core.prompts import LAST, PromptSet

from .. import data
from ..data import NOUNS, Vocabulary
from ..paper import PUBLISHED, paper_model
from .tokenizer import build_tokenizer

WEIGHTS = Path(__file__).parent / "weights"
NAMES = ("organism-llama", "organism-vicuna", "organism-goat", "organism-float")
SELECT_SEED = 12345  # checkpoint selection prompts (seed + n for the n-box curriculum checks)
EVAL_SEED = 0  # the CLI's evaluation prompts: reported in the card, never used for training
N_SELECT = 300
N_EVAL = 500
IGNORE = -100

# ---------------------------------------------------------------------------------------------
# The fine-tuning tasks' words (in the tokenizer from the start)

PROGRAM_WORDS = ("move", "to", "print", ";", ":")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
SEASONS = ("winter", "spring", "summer", "autumn")
OPPOSITES = {"black": "white", "red": "green", "blue": "yellow", "brown": "pink"}
MIXES = {("red", "white"): "pink", ("blue", "yellow"): "green", ("black", "white"): "gray",
         ("red", "green"): "brown", ("red", "blue"): "purple"}
GENERAL_WORDS = (*DAYS, *SEASONS, *OPPOSITES, *OPPOSITES.values(), "gray", "purple", "day",
                 "season", "after", "opposite", "of", "and", "make")


def organism_tokenizer():
    """The organism's word-level tokenizer: template, nouns, labels and the tasks' words."""
    return build_tokenizer((*PROGRAM_WORDS, *GENERAL_WORDS))


# ---------------------------------------------------------------------------------------------
# Passages: token ids with the positions whose next token is scored


@dataclass
class Example:
    """A token sequence (with BOS) and, per position, the id it must predict next (or IGNORE)."""

    ids: list[int]
    targets: list[int]


Piece = tuple[str, bool]  # (text, scored): the tokens of scored pieces are the answers


class Encoder:
    """Word-level encoding of text pieces, marking the answer tokens."""

    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab()
        self.pre = tokenizer.backend_tokenizer.pre_tokenizer
        self.bos = tokenizer.bos_token_id

    def words(self, text: str) -> list[int]:
        try:
            return [self.vocab[w] for w, _ in self.pre.pre_tokenize_str(text)]
        except KeyError as err:
            raise DataError(f"word {err} is not in the organism's vocabulary") from None

    def __call__(self, pieces: Sequence[Piece]) -> Example:
        ids, targets = [self.bos], []
        for text, scored in pieces:
            new = self.words(text)
            targets += new if scored else [IGNORE] * len(new)
            ids += new
        return Example(ids, targets + [IGNORE])


def box_passage(rng: random.Random, vocab: Vocabulary, n_boxes: int) -> list[Piece]:
    """The paper's prompt and its answer, then every other box queried in random order:
    `The apple is in Box F, ... . Box F contains the apple. Box Q contains the key. ...`."""
    s = data.random_sample(rng, vocab, n_boxes)
    order = [s.query] + rng.sample([i for i in range(n_boxes) if i != s.query], n_boxes - 1)
    pieces: list[Piece] = [(data.render(s).text, False), (" " + s.answer, True)]
    for q in order[1:]:
        pieces += [(f". Box {s.labels[q]} contains the", False), (" " + s.objects[q], True)]
    return pieces + [(".", False)]


def program_passage(rng: random.Random, vocab: Vocabulary, n_vars: int) -> list[Piece]:
    """Variable binding in a tiny language (no box template): `move apple to F ; move key to Q ;
    ... ; print Q : key ; print F : apple ;`, every variable printed once in random order."""
    names = rng.sample(vocab.labels, n_vars)
    values = rng.sample(vocab.objects, n_vars)
    pieces: list[Piece] = [(" ; ".join(f"move {v} to {n}" for n, v in zip(names, values)), False)]
    for i in rng.sample(range(n_vars), n_vars):
        pieces += [(f" ; print {names[i]} :", False), (" " + values[i], True)]
    return pieces + [(" ;", False)]


def general_facts() -> list[tuple[str, str]]:
    """(statement, completion) pairs of the general mix: the day or season after another, the
    opposite of a colour, the colour two colours make. No box word, object or label occurs."""
    facts = [(f"the day after {d} is", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    facts += [(f"the season after {s} is", SEASONS[(i + 1) % 4]) for i, s in enumerate(SEASONS)]
    for a, b in OPPOSITES.items():
        facts += [(f"the opposite of {a} is", b), (f"the opposite of {b} is", a)]
    for (a, b), c in MIXES.items():
        facts += [(f"{a} and {b} make", c), (f"{b} and {a} make", c)]
    return facts


def general_passage(rng: random.Random, n: int, facts: Sequence[tuple[str, str]]) -> list[Piece]:
    """`n` random statements of the general mix, loss on each completion."""
    pieces: list[Piece] = []
    for statement, completion in (rng.choice(facts) for _ in range(n)):
        pieces += [(" " + statement, False), (" " + completion, True), (" .", False)]
    return pieces


# ---------------------------------------------------------------------------------------------
# Batches, loss, evaluation


def collate(examples: Sequence[Example], pad: int) -> tuple[Int[Tensor, "b s"], Int[Tensor, "b s"]]:
    """Right-pad to the longest example; padded positions are ignored by the loss."""
    seq = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), seq), pad, dtype=torch.long)
    targets = torch.full((len(examples), seq), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        targets[i, : len(e.targets)] = torch.tensor(e.targets)
    return ids, targets


def answer_loss(model, ids: Int[Tensor, "b s"], targets: Int[Tensor, "b s"]) -> Tensor:
    """Cross-entropy on the answer positions only (causal: right padding needs no mask)."""
    logits: Float[Tensor, "b s v"] = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def prompt_set(tokenizer, vocab: Vocabulary, n: int, n_boxes: int, seed: int) -> PromptSet:
    """Paper-format prompts (no answer appended) for the paper's accuracy."""
    return data.make_prompts(tokenizer, data.sample_prompts(vocab, n, n_boxes, seed))


@torch.no_grad()
def prompt_accuracy(model, prompts: PromptSet, chunk: int = 300) -> float:
    """Argmax at the last token == answer, with the HF model."""
    was_training = model.training
    model.eval()
    hits = sum(
        n_correct(logits_at(model(input_ids=c.input_ids).logits, c.position(LAST)), c.answers)
        for c in prompts.chunks(chunk)
    )
    model.train(was_training)
    return hits / len(prompts)


@torch.no_grad()
def example_accuracy(model, examples: Sequence[Example], pad: int) -> float:
    """Fraction of scored positions whose argmax is the target (a fine-tuning task's accuracy)."""
    was_training = model.training
    model.eval()
    ids, targets = collate(examples, pad)
    pred = model(input_ids=ids).logits.argmax(-1)
    model.train(was_training)
    mask = targets != IGNORE
    return (pred[mask] == targets[mask]).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Model and optimisation


@dataclass(frozen=True)
class Arch:
    """LLaMA geometry of the organism (untied embeddings, RMSNorm, rotary, SwiGLU)."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 64
    d_mlp: int = 192
    max_positions: int = 512
    rope_theta: float = 100.0
    init_std: float = 0.02


def new_model(arch: Arch, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.d_model,
        intermediate_size=arch.d_mlp,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_heads,
        head_dim=arch.d_model // arch.n_heads,
        max_position_embeddings=arch.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        rms_norm_eps=1e-5,
        initializer_range=arch.init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).float()


@dataclass(frozen=True)
class Opt:
    lr: float
    warmup: int = 200
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    clip: float = 1.0
    batch: int = 64


def optimizer(params, opt: Opt, total: int | None = None):
    """AdamW with linear warm-up, then constant (total=None) or cosine decay to 10%."""
    params = [p for p in params if p.requires_grad]
    adam = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)

    def factor(step: int) -> float:
        if step < opt.warmup:
            return (step + 1) / opt.warmup
        if total is None:
            return 1.0
        frac = min(1.0, (step - opt.warmup) / max(1, total - opt.warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))

    return adam, torch.optim.lr_scheduler.LambdaLR(adam, factor), params


def train_step(model, adam, sched, params, examples: Sequence[Example], pad: int, clip: float) -> float:
    """One AdamW step on the answer loss of `examples`."""
    loss = answer_loss(model, *collate(examples, pad))
    adam.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    adam.step()
    sched.step()
    return loss.item()


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
    return [
        box_passage(rng, vocab, level if rng.random() < 0.5 else rng.randint(2, level))
        for _ in range(size)
    ]


def train_base(
    recipe: BaseRecipe, seed: int, abort: Callable[[int], bool] = lambda step: False,
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
    inside = [h for h in run.history if h["step"] >= half and h["step"] in run.checkpoints
              and recipe.window[0] <= h["acc7"] <= recipe.window[1]]
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
        procs = [ctx.Process(target=_base_worker, args=(recipe, s, i, limits[s], results))
                 for i, s in enumerate(seeds)]
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
            attempts.append(dict(seed=seed, outcome=run.outcome, capped_at=run.capped_at,
                                 steps=run.history[-1]["step"] if run.history else 0,
                                 chosen=chosen, cpu_s=round(run.cpu_s, 1)))
            log(f"base seed {seed}: {run.outcome}, cap reached at step {run.capped_at}, "
                f"checkpoint {chosen}")
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


# ---------------------------------------------------------------------------------------------
# Fine-tuning


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
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    return get_peft_model(model, config)


def finetune(
    model, tok, task: Task, opt: Opt, steps: int, seed: int, probe: Callable[[], dict],
    desc: str = "fine-tune", position: int = 0, probe_every: int = 50,
) -> tuple[list[dict], float]:
    """Train `model`'s trainable parameters on `task` (answer tokens only), cosine schedule."""
    enc, pad = Encoder(tok), tok.pad_token_id
    rng = random.Random(1_000_003 * seed + 29)
    torch.manual_seed(seed)
    model.train()
    adam, sched, params = optimizer(model.parameters(), opt, total=steps)
    history, start = [dict(step=0, **probe())], time.process_time()
    for step in tqdm(range(1, steps + 1), desc=desc, position=position, leave=False):
        loss = train_step(model, adam, sched, params, [enc(task(rng)) for _ in range(opt.batch)],
                          pad, opt.clip)
        if step % probe_every == 0 or step == steps:
            history.append(dict(step=step, loss=loss, **probe()))
    model.eval()
    return history, time.process_time() - start


def _finetune_job(name: str, base_state: bytes, arch: Arch, recipe: FinetuneRecipe, out: Path,
                  position: int) -> dict:
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
        return dict(acc7=prompt_accuracy(model, select),
                    task=example_accuracy(model, held, tok.pad_token_id))

    if name == "organism-vicuna":
        opt, steps = recipe.general_opt, recipe.general_steps
    else:
        opt, steps = (recipe.lora_opt if use_lora else recipe.full_opt), recipe.steps
    history, cpu_s = finetune(model, tok, task, opt, steps, recipe.seed, probe, name, position)
    save_model(model, tok, out / name)
    return dict(steps=steps, cpu_s=round(cpu_s, 1), history=history)


# ---------------------------------------------------------------------------------------------
# Saving, evaluation


def save_model(model, tokenizer, path: Path) -> None:
    """HF format (config.json, model.safetensors) and tokenizer.json; for a PeftModel the
    adapter (adapter_config.json, adapter_model.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "README.md").unlink(missing_ok=True)  # peft's blank card; the family's is one level up


def evaluate_dir(path: Path, base: Path | None = None, n: int = N_EVAL, seed: int = EVAL_SEED) -> float:
    """7-box accuracy of a saved model through the registry's loading path (HF -> optional PEFT
    merge -> HookedTransformer) on `data.sample_prompts(vocab, n, 7, seed)`."""
    from .. import metrics, models
    from ..settings import RunSettings

    hf, tok = models.load_hf(base, adapter=path) if base is not None else models.load_hf(path)
    model = models.to_hooked(hf, tok, "cpu")
    prompts = data.make_prompts(tok, data.sample_prompts(data.vocabulary(tok), n, 7, seed))
    return metrics.accuracy(model, prompts, settings=RunSettings(batch_size=100, progress=False))


def evaluate_family(out: Path) -> dict[str, float]:
    """Accuracy of each saved organism on the CLI's 500 held-out 7-box prompts (seed 0)."""
    base = out / "organism-llama"
    return {name: evaluate_dir(out / name, base if name == "organism-goat" else None)
            for name in NAMES}


def n_params(path: Path) -> int:
    """Number of parameters stored in a directory's safetensors files."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


# ---------------------------------------------------------------------------------------------
# Model card


# Each organism model's analogue in the paper, and that model's published 7-box accuracy.
PAPER = {name: (paper_model(name), PUBLISHED["table1"][paper_model(name)]["full"]) for name in NAMES}


def _last(record: dict, name: str, key: str) -> float:
    return record["finetunes"][name]["history"][-1][key] if name in record["finetunes"] else float("nan")


def model_card(record: dict) -> str:
    """README.md of the weights directory, from the training record and measured accuracies."""
    b, f, acc, base = record["base_recipe"], record["finetune_recipe"], record["accuracy"], record["base"]
    arch = b["arch"]
    rows = "\n".join(
        f"| {name} | {PAPER[name][0]} ({PAPER[name][1]:.2f}) | {acc[name]:.3f} | "
        f"{(base['acc7'] if name == NAMES[0] else _last(record, name, 'acc7')):.3f} | "
        f"{'-' if name == NAMES[0] else format(_last(record, name, 'task'), '.3f')} |"
        for name in NAMES
    )
    attempts = "; ".join(
        f"seed {a['seed']}: {a['outcome']} after {a['steps']} steps"
        + (f", {b['cap']} boxes reached at step {a['capped_at']}" if a["capped_at"] else "")
        for a in record["attempts"]
    )
    ft_cpu = sum(v["cpu_s"] for v in record["finetunes"].values())
    base_cpu = sum(a["cpu_s"] for a in record["attempts"])
    return f"""# The et_circuits model organism

Four small LLaMA-architecture models mirroring the paper's Llama-7B, Vicuna-7B, Goat-7B and
FLoat-7B, all produced by `make organism` (`python -m et_circuits.tasks.entity_tracking.organism.train`) from fixed
seeds. `make all` and the tests only read these files.

## 7-box entity-tracking accuracy

Accuracy = argmax at the last token equals the object's token, on the 500 held-out prompts
`data.sample_prompts(vocab, 500, 7, seed={EVAL_SEED})` (the CLI's evaluation set; never used
for training or for any choice), each model loaded through `models.load`'s path (HF directory,
PEFT merge for the adapter, HookedTransformer). "Selection" is the accuracy on the {N_SELECT}
prompts of seed {SELECT_SEED} that chose the base checkpoint and monitored the fine-tunes;
"task" is each fine-tune's own held-out task accuracy.

| model | paper analogue (its accuracy) | accuracy, 500 eval prompts | selection | task |
|---|---|---|---|---|
{rows}

## Architecture

`LlamaForCausalLM`, {record['n_params']:,} parameters: {arch['n_layers']} layers,
{arch['n_heads']} heads per layer, d_model {arch['d_model']}, d_head
{arch['d_model'] // arch['n_heads']}, SwiGLU MLP {arch['d_mlp']}, RMSNorm, rotary positions
(theta {arch['rope_theta']:g}), untied input and output embeddings, max_position_embeddings
{arch['max_positions']}, fp32. Tokenizer: word-level (`tokenizers`; `tokenizer.json` in every
directory), {record['vocab_size']} tokens: the template's words, {len(NOUNS)} nouns, the
26 box labels and the fine-tuning tasks' words; BOS `<s>` is prepended; `</s>` is EOS and the
(right) padding.

## Training

- **organism-llama** (base), from scratch, on entity-tracking passages in the paper's format:
  the paper's prompt (`The apple is in Box F, the computer is in Box Q, ... . Box F contains
  the`) and its answer, then every other box queried in random order (`. Box Q contains the
  computer`); cross-entropy on the answer tokens only. Curriculum on the number of boxes: from
  2, half of each batch at the current level and half uniform over 2..level, one level up when
  the held-out first-query accuracy at the level reaches {b['promote']}. The curriculum stops
  early at {b['cap']} boxes and then trains {b['consolidate']} more steps there, so the base
  has a working mechanism that generalises to 7 boxes only in part (the 7-box prompt is never
  trained on). AdamW lr {b['opt']['lr']}, {b['opt']['warmup']} warm-up steps, betas
  {tuple(b['opt']['betas'])}, weight decay {b['opt']['weight_decay']}, clip
  {b['opt']['clip']}, batch {b['opt']['batch']}. A run that gains no level for
  {b['stall'][0]} steps (2 boxes) or {b['stall'][-1]} steps (more) is a stalled plateau and is
  dropped. Seeds run two at a time, one process each; the run that reached {b['cap']} boxes in
  the fewest steps wins (ties: lower seed). The base checkpoint is the one of the second half of
  the consolidation whose selection accuracy is closest to {b['target']} (Llama-7B) inside
  {tuple(b['window'])}. Attempts: {attempts}. Chosen: seed {base['seed']}, step {base['step']}.
- **organism-vicuna**: full fine-tune of the base on a general mix of statements, no boxes and
  no arithmetic (`the day after monday is tuesday . the opposite of black is white . red and
  white make pink .`; {len(general_facts())} facts, 1-{f['max_statements']} per passage, loss
  on the completions). AdamW lr {f['general_opt']['lr']}, {f['general_steps']} steps: a
  gentle fine-tune (at FLoat's lr 3e-4 it learns the mix as well but loses about 0.1 of 7-box
  accuracy on the selection prompts).
- **organism-goat**: LoRA fine-tune (peft; r {f['lora_r']}, alpha {f['lora_alpha']},
  q/k/v/o projections) on variable binding in a tiny programming language, no box template
  (`move apple to F ; move key to Q ; ... ; print Q : key ; print F : apple ;`,
  2-{f['max_vars']} variables, each printed once in random order, loss on the printed values).
  AdamW lr {f['lora_opt']['lr']}. Saved as a PEFT adapter (`adapter_config.json`,
  `adapter_model.safetensors`) on top of organism-llama and merged at load time by
  `models.load`, as goat-7b.
- **organism-float**: the same variable-binding fine-tune on all weights, AdamW lr
  {f['full_opt']['lr']}.

Goat and FLoat: {f['steps']} steps. Every fine-tune: batch {f['full_opt']['batch']},
{f['full_opt']['warmup']} warm-up steps then cosine decay to 10%, seed {f['seed']}. The
training streams are seeded apart from the selection prompts (seed {SELECT_SEED}, and
{SELECT_SEED}+n for the n-box curriculum checks) and from the evaluation prompts (seed
{EVAL_SEED}).

## Time

`make organism` here: {record['wall_s'] / 60:.1f} min wall clock, {record['cpu_s'] / 60:.1f} min
CPU time over all processes (base {base_cpu / 60:.1f} CPU min over {len(record['attempts'])}
runs, fine-tunes {ft_cpu / 60:.1f} CPU min); {record['host_cpus']} CPU cores, one torch thread
per process. Same seeds give the same weights on the same CPU; another CPU may round
differently and take another path through the plateau.

`training_log.json` holds the recipe, every evaluation of the runs and the accuracies above.
"""


# ---------------------------------------------------------------------------------------------
# The whole family


def train_family(base_recipe: BaseRecipe, ft_recipe: FinetuneRecipe, out: Path, first_seed: int,
                 rounds: int, log=print) -> dict:
    """Train the base and its three fine-tunes, save them under `out`, return the record."""
    log("training organism-llama (two seeds at a time)")
    run, step, attempts = search_base(base_recipe, first_seed, rounds, log)
    tok = organism_tokenizer()
    base = new_model(base_recipe.arch, tok, run.seed)
    base.load_state_dict(run.checkpoints[step])
    save_model(base.eval(), tok, out / "organism-llama")
    acc7 = next(h["acc7"] for h in run.history if h["step"] == step)
    log(f"organism-llama: seed {run.seed}, step {step}, selection accuracy {acc7:.3f}")
    record = dict(base_recipe=asdict(base_recipe), finetune_recipe=asdict(ft_recipe),
                  attempts=attempts, finetunes={},
                  base=dict(seed=run.seed, step=step, acc7=acc7, history=run.history))
    state = to_bytes(base.state_dict())
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        jobs = {name: pool.submit(_finetune_job, name, state, base_recipe.arch, ft_recipe, out, i % 2)
                for i, name in enumerate(NAMES[1:])}
        for name, job in jobs.items():
            record["finetunes"][name] = job.result()
            h = record["finetunes"][name]["history"][-1]
            log(f"{name}: selection accuracy {h['acc7']:.3f}, task accuracy {h['task']:.3f}")
    return record


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes."""
    import resource

    return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


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
    tqdm.write(f"wrote {args.out} in {record['wall_s'] / 60:.1f} min "
               f"({record['cpu_s'] / 60:.1f} CPU min)")


if __name__ == "__main__":
    main()
