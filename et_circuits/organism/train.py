"""Train the model organism: a small LLaMA base and its three fine-tunes, mirroring the paper's
Llama-7B, Vicuna-7B, Goat-7B and FLoat-7B.

Run as `python -m et_circuits.organism.train` (`make organism`). Every stage is seeded; the
four models, their tokenizer and the model card (README.md) are rewritten under `weights/`.

- organism-llama: trained from scratch on entity-tracking passages in the paper's format, every
  box queried after the context, loss on the answers only, with a curriculum over the number of
  boxes. A stalled run restarts with the next seed. The base is the checkpoint whose held-out
  7-box accuracy (selection prompts, seed 12345) is closest to the target (Llama-7B's 0.66).
- organism-vicuna: full fine-tune on a general question-answering mix (no boxes, no arithmetic).
- organism-goat: LoRA (q/k/v/o) fine-tune on variable binding in a tiny programming language
  (no box template); saved as a PEFT adapter on top of organism-llama.
- organism-float: the same variable-binding fine-tune on all weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine

import argparse
import copy
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .. import data
from ..data import LABELS, NOUNS, Sample, Vocabulary
from .tokenizer import build_tokenizer

WEIGHTS = Path(__file__).parent / "weights"
SELECT_SEED = 12345  # checkpoint / hyper-parameter selection prompts (7 boxes)
EVAL_SEED = 0  # the CLI's evaluation prompts: reported in the card, never used in training
N_SELECT = 300
N_EVAL = 500
IGNORE = -100

# ---------------------------------------------------------------------------------------------
# Vocabulary of the fine-tuning tasks (added to the tokenizer before the base is trained)

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
KINDS = ("food", "tool", "toy", "clothing", "furniture", "machine")
PROGRAM_WORDS = ("let", "print", "=", ";", ":", "move", "to")
CHAT_WORDS = ("Q", "A", "what", "color", "kind", "of", "thing", "letter", "comes", "after", "?", "a")
EXTRA_WORDS = (*PROGRAM_WORDS[:5], *CHAT_WORDS, *COLORS, *KINDS, *PROGRAM_WORDS[5:])  # + GENERAL_WORDS below


def organism_tokenizer():
    """The organism's word-level tokenizer: template, nouns, labels and the tasks' words."""
    return build_tokenizer((*EXTRA_WORDS, *GENERAL_WORDS))


# ---------------------------------------------------------------------------------------------
# Examples: token ids with the positions whose next token is scored


@dataclass
class Example:
    """A token sequence (with BOS) and, per position, the id it must predict next (or IGNORE)."""

    ids: list[int]
    targets: list[int]


Piece = tuple[str, bool]  # (text, scored): scored pieces are the answers


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
            raise data.DataError(f"word {err} is not in the organism's vocabulary") from None

    def __call__(self, pieces: Sequence[Piece]) -> Example:
        ids, targets = [self.bos], []
        for text, scored in pieces:
            new = self.words(text)
            targets += new if scored else [IGNORE] * len(new)
            ids += new
        return Example(ids, targets + [IGNORE])


def box_passage(rng: random.Random, vocab: Vocabulary, n_boxes: int) -> list[Piece]:
    """The paper's prompt followed by its answer, then every other box queried in random order:
    `... Box F contains the apple. Box Q contains the computer. ...`. The first query is the
    paper's prompt exactly."""
    s = data.random_sample(rng, vocab, n_boxes)
    order = [s.query] + rng.sample([i for i in range(n_boxes) if i != s.query], n_boxes - 1)
    pieces: list[Piece] = [(data.render(s).text, False), (" " + s.answer, True)]
    for q in order[1:]:
        pieces += [(f". Box {s.labels[q]} contains the", False), (" " + s.objects[q], True)]
    return pieces + [(".", False)]


SYNTAX = {  # how a tiny language binds a value to a variable name
    "let": "let {name} = {value}",  # name first
    "move": "move {value} to {name}",  # value first (COBOL's MOVE)
}


def program_passage(
    rng: random.Random, vocab: Vocabulary, n_vars: int, syntax: str = "move"
) -> list[Piece]:
    """Variable binding in a tiny language (no box template), e.g. `move apple to F ; move key
    to Q ; ... ; print Q : key ; print F : apple ;`, every variable printed once in random order."""
    names = rng.sample(vocab.labels, n_vars)
    values = rng.sample(vocab.objects, n_vars)
    code = " ; ".join(SYNTAX[syntax].format(name=n, value=v) for n, v in zip(names, values))
    pieces: list[Piece] = [(code, False)]
    for i in rng.sample(range(n_vars), n_vars):
        pieces += [(f" ; print {names[i]} :", False), (" " + values[i], True)]
    return pieces + [(" ;", False)]


@dataclass(frozen=True)
class Facts:
    """A fixed world for the general question-answering mix: a color and a kind per noun."""

    color: dict[str, str]
    kind: dict[str, str]

    @staticmethod
    def make(seed: int = 7) -> "Facts":
        rng = random.Random(seed)
        return Facts({n: rng.choice(COLORS) for n in NOUNS}, {n: rng.choice(KINDS) for n in NOUNS})


TOPICS = ("color", "kind", "letter")


def chat_passage(
    rng: random.Random, vocab: Vocabulary, n_turns: int, facts: Facts, topics: Sequence[str] = TOPICS
) -> list[Piece]:
    """General question answering (no boxes, no arithmetic): object colors and kinds, letter
    order. `Q : what color is the apple ? A : red . Q : what letter comes after F ? A : G .`"""
    pieces: list[Piece] = []
    for _ in range(n_turns):
        topic = rng.choice(topics)
        if topic == "letter":
            i = rng.randrange(len(LABELS) - 1)
            q, a = f"what letter comes after {LABELS[i]}", LABELS[i + 1]
        else:
            obj = rng.choice(vocab.objects)
            q, a = (f"what color is the {obj}", facts.color[obj]) if topic == "color" else (
                f"what kind of thing is the {obj}", facts.kind[obj])
        pieces += [(f" Q : {q} ? A :", False), (" " + a, True), (" .", False)]
    return pieces


DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
SEASONS = ("winter", "spring", "summer", "autumn")
OPPOSITES = {"black": "white", "red": "green", "blue": "yellow", "brown": "pink"}
MIXES = {("red", "white"): "pink", ("blue", "yellow"): "green", ("black", "white"): "gray",
         ("red", "green"): "brown", ("red", "blue"): "purple"}
GENERAL_WORDS = (*DAYS, *SEASONS, "day", "season", "opposite", "do", "you", "get", "from", "and",
                 "gray", "purple")


def general_facts() -> list[tuple[str, str]]:
    """(question, answer) pairs of the general mix: days, seasons, opposite and mixed colors.
    No nouns of the box task and no letters appear, so the mix is apart from entity tracking."""
    qa = [(f"what day comes after {d}", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    qa += [(f"what season comes after {s}", SEASONS[(i + 1) % 4]) for i, s in enumerate(SEASONS)]
    for a, b in OPPOSITES.items():
        qa += [(f"what is the opposite of {a}", b), (f"what is the opposite of {b}", a)]
    for (a, b), c in MIXES.items():
        qa += [(f"what do you get from {a} and {b}", c), (f"what do you get from {b} and {a}", c)]
    return qa


def general_passage(rng: random.Random, n_turns: int, qa: Sequence[tuple[str, str]]) -> list[Piece]:
    """A conversation of `n_turns` questions and answers: `Q : what day comes after monday ?
    A : tuesday . Q : ...`; loss on the answers."""
    pieces: list[Piece] = []
    for q, a in (rng.choice(qa) for _ in range(n_turns)):
        pieces += [(f" Q : {q} ? A :", False), (" " + a, True), (" .", False)]
    return pieces


def text_sentence(rng: random.Random, vocab: Vocabulary, facts: Facts) -> str:
    """One sentence of the base's general text: facts about the world, the alphabet, questions
    with their answers, and statements of a tiny programming language (never a query of it)."""
    obj, i = rng.choice(vocab.objects), rng.randrange(len(LABELS) - 1)
    name, other = rng.choice(vocab.labels), rng.choice(vocab.objects)
    return rng.choice([
        f"the {obj} is {facts.color[obj]} .",
        f"the {obj} is a {facts.kind[obj]} .",
        f"after {LABELS[i]} comes {LABELS[i + 1]} .",
        f"what color is the {obj} ? the {obj} is {facts.color[obj]} .",
        f"what kind of thing is the {obj} ? a {facts.kind[obj]} .",
        f"what letter comes after {LABELS[i]} ? {LABELS[i + 1]} .",
        f"let {name} = {other} ;",
        f"move {other} to {name} ;",
        f"print {name} ;",
    ])


def text_passage(rng: random.Random, vocab: Vocabulary, facts: Facts, n: int = 4) -> list[Piece]:
    """General text for the base (every token scored, plain language modelling)."""
    return [(" " + text_sentence(rng, vocab, facts), True) for _ in range(rng.randint(1, n))]


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


@dataclass
class PromptSet:
    """Paper-format prompts (no answer appended) for first-query accuracy."""

    ids: Int[Tensor, "n s"]
    last: Int[Tensor, " n"]
    answer: Int[Tensor, " n"]

    @staticmethod
    def make(tokenizer, vocab: Vocabulary, n: int, n_boxes: int, seed: int) -> "PromptSet":
        batch = data.make_batch(tokenizer, data.sample_prompts(vocab, n, n_boxes, seed))
        return PromptSet(batch.input_ids, batch.last, batch.answer)


@torch.no_grad()
def prompt_accuracy(model, prompts: PromptSet, chunk: int = 250) -> float:
    """Argmax at the last token == answer (the paper's accuracy), with the HF model."""
    was_training = model.training
    model.eval()
    hits = 0
    for i in range(0, len(prompts.ids), chunk):
        logits = model(input_ids=prompts.ids[i : i + chunk]).logits
        rows = torch.arange(logits.shape[0])
        pred = logits[rows, prompts.last[i : i + chunk]].argmax(-1)
        hits += (pred == prompts.answer[i : i + chunk]).sum().item()
    model.train(was_training)
    return hits / len(prompts.ids)


@torch.no_grad()
def example_accuracy(model, examples: Sequence[Example], pad: int) -> float:
    """Fraction of scored positions whose argmax is the target (a fine-tuning task's accuracy)."""
    was_training = model.training
    model.eval()
    ids, targets = collate(examples, pad)
    pred = model(input_ids=ids).logits.argmax(-1)
    mask = targets != IGNORE
    model.train(was_training)
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
    rope_theta: float = 10000.0
    d_head: int | None = None  # default d_model // n_heads
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
        head_dim=arch.d_head or arch.d_model // arch.n_heads,
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
        frac = (step - opt.warmup) / max(1, total - opt.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac)))

    return adam, torch.optim.lr_scheduler.LambdaLR(adam, factor), params


def train_step(
    model, adam, sched, params, examples: Sequence[Example], pad: int, clip: float,
    extra: Sequence[Example] = (), extra_weight: float = 0.0,
) -> float:
    """One AdamW step on the answer loss of `examples` (+ `extra_weight` x that of `extra`)."""
    loss = answer_loss(model, *collate(examples, pad))
    if extra:
        loss = loss + extra_weight * answer_loss(model, *collate(extra, pad))
    adam.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    adam.step()
    sched.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# The base: curriculum over the number of boxes


@dataclass
class BaseRun:
    """One curriculum run: evaluation history and a checkpoint at every evaluation."""

    seed: int
    history: list[dict] = field(default_factory=list)
    checkpoints: dict[int, dict] = field(default_factory=dict)
    stalled: bool = False
    seconds: float = 0.0


def box_batch(rng: random.Random, vocab: Vocabulary, level: int, size: int) -> list[list[Piece]]:
    """Half the passages at the current level, the rest uniform over 2..level boxes."""
    return [
        box_passage(rng, vocab, level if rng.random() < 0.5 else rng.randint(2, level))
        for _ in range(size)
    ]


def train_base(
    tokenizer, vocab: Vocabulary, arch: Arch, opt: Opt, seed: int, select: PromptSet,
    max_steps: int = 4000, eval_every: int = 25, promote: float = 0.9, stall: int = 1500,
    stop_above: float = 0.95, log: Callable[[dict], None] | None = None, start_level: int = 2,
    facts: Facts | None = None, text_batch: int = 0, text_weight: float = 0.5,
) -> BaseRun:
    """Curriculum from 2 to 7 boxes; up a level when held-out first-query accuracy at the level
    reaches `promote`. Stops once 7-box accuracy passes `stop_above`, or flags a stall when no
    level is gained for `stall` steps."""
    enc, pad = Encoder(tokenizer), tokenizer.pad_token_id
    facts = facts or Facts.make()
    model = new_model(arch, tokenizer, seed)
    model.train()
    adam, sched, params = optimizer(model.parameters(), opt)
    rng = random.Random(1_000_003 * seed + 17)  # the training stream, apart from all held-out sets
    levels = {n: PromptSet.make(tokenizer, vocab, 200, n, SELECT_SEED + n) for n in range(2, 7)}
    levels[7] = select
    run, level, since = BaseRun(seed), start_level, 0
    start = time.process_time()
    bar = tqdm(range(max_steps), desc=f"base seed {seed}", leave=False)
    for step in bar:
        examples = [enc(p) for p in box_batch(rng, vocab, level, opt.batch)]
        text = [enc(text_passage(rng, vocab, facts)) for _ in range(text_batch)]
        loss = train_step(model, adam, sched, params, examples, pad, opt.clip, text, text_weight)
        if (step + 1) % eval_every:
            continue
        acc_level, acc7 = prompt_accuracy(model, levels[level]), prompt_accuracy(model, select)
        run.history.append(dict(step=step + 1, level=level, acc_level=acc_level, acc7=acc7, loss=loss))
        run.checkpoints[step + 1] = copy.deepcopy(model.state_dict())
        bar.set_postfix(level=level, acc=f"{acc_level:.2f}", acc7=f"{acc7:.2f}", loss=f"{loss:.2f}")
        if log is not None:
            log(run.history[-1])
        if acc_level >= promote and level < 7:
            level, since = level + 1, step
        if acc7 >= stop_above:
            break
        if step - since > stall:
            run.stalled = True
            break
    run.seconds = time.process_time() - start
    return run


def select_base(run: BaseRun, target: float, window: tuple[float, float]) -> int:
    """The evaluated step whose 7-box selection accuracy is closest to `target` inside `window`
    (the latest such step on ties)."""
    inside = [h for h in run.history if window[0] <= h["acc7"] <= window[1]]
    if not inside:
        raise RuntimeError(f"no checkpoint of seed {run.seed} has 7-box accuracy in {window}")
    best = min(inside, key=lambda h: (abs(h["acc7"] - target), -h["step"]))
    return best["step"]


# ---------------------------------------------------------------------------------------------
# Fine-tuning


Task = Callable[[random.Random], list[Piece]]


def program_task(vocab: Vocabulary, max_vars: int = 7, syntax: str = "move") -> Task:
    """Variable binding with 2..max_vars variables (Goat / FLoat's fine-tuning data)."""
    return lambda rng: program_passage(rng, vocab, rng.randint(2, max_vars), syntax)


def general_task(max_turns: int = 6) -> Task:
    """The general question-answering mix, 1..max_turns turns (Vicuna's fine-tuning data)."""
    qa = general_facts()
    return lambda rng: general_passage(rng, rng.randint(1, max_turns), qa)


def chat_task(vocab: Vocabulary, facts: Facts, max_turns: int = 6, topics: Sequence[str] = TOPICS) -> Task:
    """General question answering, 1..max_turns turns (Vicuna's fine-tuning data)."""
    return lambda rng: chat_passage(rng, vocab, rng.randint(1, max_turns), facts, topics)


@dataclass
class FinetuneRun:
    steps: int
    seconds: float
    history: list[dict]


def finetune(
    model, tokenizer, task: Task, opt: Opt, steps: int, seed: int, desc: str,
    probe: Callable[[], dict] | None = None, probe_every: int = 50,
) -> FinetuneRun:
    """Train `model`'s trainable parameters on `task` (answer tokens only), cosine schedule."""
    enc, pad = Encoder(tokenizer), tokenizer.pad_token_id
    rng = random.Random(1_000_003 * seed + 29)
    torch.manual_seed(seed)
    model.train()
    adam, sched, params = optimizer(model.parameters(), opt, total=steps)
    history, start = [], time.process_time()
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        loss = train_step(model, adam, sched, params, [enc(task(rng)) for _ in range(opt.batch)], pad, opt.clip)
        if probe is not None and ((step + 1) % probe_every == 0 or step == 0):
            history.append(dict(step=step + 1, loss=loss, **probe()))
            bar.set_postfix({k: f"{v:.2f}" for k, v in history[-1].items() if k != "step"})
    model.eval()
    return FinetuneRun(steps, time.process_time() - start, history)


def lora(model, r: int, alpha: int, seed: int):
    """Wrap `model` in a PEFT LoRA on the attention projections (as Goat-7B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# Saving, evaluation, model card


def save_model(model, tokenizer, path: Path) -> None:
    """HF format (config.json, model.safetensors) plus tokenizer.json; for a PeftModel the
    adapter (adapter_config.json, adapter_model.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def evaluate_dir(path: Path, base: Path | None = None, n: int = N_EVAL, seed: int = EVAL_SEED) -> float:
    """7-box accuracy of a saved model through the registry's loading path (HF -> optional
    PEFT merge -> HookedTransformer), on `data.sample_prompts(vocab, n, 7, seed)`."""
    from .. import metrics, models

    if base is None:
        hf, tok = models.load_hf(path)
    else:
        hf, tok = models.load_hf(base, adapter=path)
    model = models.to_hooked(hf, tok, "cpu")
    batch = data.make_batch(tok, data.sample_prompts(data.vocabulary(tok), n, 7, seed))
    return metrics.accuracy(model, batch, batch_size=100, progress=False)


# ---------------------------------------------------------------------------------------------
# The whole family


@dataclass(frozen=True)
class Recipe:
    """Every setting of `make organism` (recorded in the model card)."""

    arch: Arch = Arch()
    base_seed: int = 0
    base_attempts: int = 6
    base_opt: Opt = Opt(lr=3e-3)
    base_max_steps: int = 4000
    base_stall: int = 1500
    base_target: float = 0.66  # Llama-7B's accuracy in the paper
    base_window: tuple[float, float] = (0.5, 0.8)
    ft_seed: int = 1
    ft_steps: int = 300
    vicuna_opt: Opt = Opt(lr=1e-3, warmup=30)
    goat_opt: Opt = Opt(lr=3e-3, warmup=30)
    float_opt: Opt = Opt(lr=1e-3, warmup=30)
    lora_r: int = 8
    lora_alpha: int = 16
    max_vars: int = 7
    max_turns: int = 6
    facts_seed: int = 7
    threads: int = 2


def train_family(recipe: Recipe, out: Path, log=print) -> dict:
    """Train the base and its three fine-tunes, save them under `out`, return the record."""
    tok = organism_tokenizer()
    vocab = data.vocabulary(tok)
    select = PromptSet.make(tok, vocab, N_SELECT, 7, SELECT_SEED)
    record: dict = {"recipe": asdict(recipe), "attempts": []}

    run = None
    for attempt in range(recipe.base_attempts):
        seed = recipe.base_seed + attempt
        run = train_base(tok, vocab, recipe.arch, recipe.base_opt, seed, select,
                         recipe.base_max_steps, stall=recipe.base_stall)
        steps = run.history[-1]["step"] if run.history else 0
        ok = not run.stalled and any(recipe.base_window[0] <= h["acc7"] <= recipe.base_window[1]
                                     for h in run.history)
        record["attempts"].append(dict(seed=seed, steps=steps, stalled=run.stalled,
                                       cpu_s=round(run.seconds, 1), used=ok))
        log(f"base seed {seed}: {steps} steps, {'usable' if ok else 'stalled, restarting'}")
        if ok:
            break
    else:
        raise RuntimeError(f"no base reached the 7-box window in {recipe.base_attempts} attempts")
    step = select_base(run, recipe.base_target, recipe.base_window)
    base = new_model(recipe.arch, tok, run.seed)
    base.load_state_dict(run.checkpoints[step])
    base.eval()
    record["base"] = dict(seed=run.seed, step=step, history=run.history)
    save_model(base, tok, out / "organism-llama")
    log(f"organism-llama: seed {run.seed} step {step}, selection accuracy "
        f"{prompt_accuracy(base, select):.3f}")

    probe = lambda m: (lambda: {"acc7": prompt_accuracy(m, select)})  # noqa: E731
    facts = Facts.make(recipe.facts_seed)
    jobs = {
        "organism-vicuna": (chat_task(vocab, facts, recipe.max_turns), recipe.vicuna_opt, False),
        "organism-goat": (program_task(vocab, recipe.max_vars), recipe.goat_opt, True),
        "organism-float": (program_task(vocab, recipe.max_vars), recipe.float_opt, False),
    }
    for name, (task, opt, use_lora) in jobs.items():
        model = copy.deepcopy(base)
        if use_lora:
            model = lora(model, recipe.lora_r, recipe.lora_alpha, recipe.ft_seed)
        ft = finetune(model, tok, task, opt, recipe.ft_steps, recipe.ft_seed, name, probe(model))
        record[name] = dict(steps=ft.steps, cpu_s=round(ft.seconds, 1), history=ft.history)
        save_model(model, tok, out / name)
        log(f"{name}: {ft.steps} steps, selection accuracy {ft.history[-1]['acc7']:.3f}")
    return record


def evaluate_family(out: Path) -> dict[str, float]:
    """Accuracy of each saved organism on the CLI's 500 held-out 7-box prompts (seed 0)."""
    base = out / "organism-llama"
    return {
        "organism-llama": evaluate_dir(base),
        "organism-vicuna": evaluate_dir(out / "organism-vicuna"),
        "organism-goat": evaluate_dir(out / "organism-goat", base=base),
        "organism-float": evaluate_dir(out / "organism-float"),
    }


def n_params(path: Path) -> int:
    """Number of parameters stored in a directory's safetensors files."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


PAPER = {"organism-llama": ("Llama-7B", 0.66), "organism-vicuna": ("Vicuna-7B", 0.67),
         "organism-goat": ("Goat-7B", 0.82), "organism-float": ("FLoat-7B", 0.82)}


def model_card(record: dict, acc: dict[str, float], out: Path) -> str:
    """README.md of the weights directory, from the training record and measured accuracies."""
    r, b = record["recipe"], record["base"]
    arch = r["arch"]
    rows = "\n".join(
        f"| {name} | {PAPER[name][0]} ({PAPER[name][1]:.2f}) | {acc[name]:.3f} | "
        f"{record.get(name, {}).get('history', [{}])[-1].get('acc7', b['acc7']):.3f} |"
        for name in PAPER
    )
    attempts = "; ".join(
        f"seed {a['seed']}: {a['steps']} steps, {'used' if a['used'] else 'stalled, restarted'}"
        for a in record["attempts"]
    )
    ft = lambda name: record[name]  # noqa: E731
    return f"""# The et_circuits model organism

Four small LLaMA-architecture models trained by `make organism`
(`python -m et_circuits.organism.train`), mirroring the paper's Llama-7B, Vicuna-7B, Goat-7B and
FLoat-7B. Everything here is produced by that command from fixed seeds; `make all` and the tests
only read these files.

## Measured 7-box entity-tracking accuracy

Argmax at the last token equals the object's token, on the 500 held-out prompts
`data.sample_prompts(vocab, 500, 7, seed={EVAL_SEED})` (the CLI's default evaluation set, never
used for training or selection), each model loaded through `models.load`'s path (HF directory,
PEFT merge for the adapter, HookedTransformer). The last column is the accuracy on the
{N_SELECT} selection prompts (seed {SELECT_SEED}) used to pick the base checkpoint and watch the
fine-tunes.

| model | paper analogue (paper accuracy) | accuracy, 500 eval prompts | selection prompts |
|---|---|---|---|
{rows}

## Architecture

`LlamaForCausalLM`: {arch['n_layers']} layers, {arch['n_heads']} heads per layer,
d_model {arch['d_model']}, d_head {arch['d_model'] // arch['n_heads']}, SwiGLU MLP
{arch['d_mlp']}, RMSNorm, rotary positions (theta 10000), untied input and output embeddings,
max_position_embeddings {arch['max_positions']}, fp32; {record['n_params']:,} parameters.
Tokenizer: word-level (`tokenizers`, `tokenizer.json` in every directory), {record['vocab_size']}
tokens: the template's words, {len(NOUNS)} nouns, the 26 box labels and the fine-tuning tasks'
words; BOS `<s>` is prepended, `</s>` is EOS and padding (right).

## Training data and schedule

- **organism-llama** (base): trained from scratch on entity-tracking passages in the paper's
  format: the paper's prompt (`The apple is in Box F, the computer is in Box Q, ... . Box F
  contains the`) followed by its answer, then every other box queried in random order
  (`. Box Q contains the computer`); cross-entropy on the answer tokens only. Curriculum on the
  number of boxes: starting at 2, half of each batch at the current level and half uniform over
  2..level, one level up when held-out first-query accuracy at the level reaches 0.9, up to 7.
  AdamW lr {r['base_opt']['lr']}, {r['base_opt']['warmup']} warm-up steps, betas
  {tuple(r['base_opt']['betas'])}, weight decay {r['base_opt']['weight_decay']}, clip
  {r['base_opt']['clip']}, batch {r['base_opt']['batch']}. A run that gains no level for
  {r['base_stall']} steps is a stalled plateau and restarts with the next seed. A checkpoint is
  kept every 25 steps; the base is the one whose selection 7-box accuracy is closest to
  {r['base_target']} (Llama-7B) inside {tuple(r['base_window'])}: the base is caught on its way
  up, so fine-tuning has room. Attempts: {attempts}. Chosen: seed {b['seed']}, step {b['step']}.
- **organism-vicuna**: full fine-tune of the base on a general question-answering mix, no
  boxes and no arithmetic (`Q : what color is the apple ? A : red . Q : what kind of thing is
  the key ? A : tool . Q : what letter comes after F ? A : G .`, a fixed random world of
  colors and kinds, seed {r['facts_seed']}; 1-{r['max_turns']} turns per passage, loss on the
  answers). {ft('organism-vicuna')['steps']} steps, AdamW lr {r['vicuna_opt']['lr']}
  ({r['vicuna_opt']['warmup']} warm-up, cosine to 10%), batch {r['vicuna_opt']['batch']}.
- **organism-goat**: LoRA fine-tune (peft; r {r['lora_r']}, alpha {r['lora_alpha']}, q/k/v/o
  projections) on variable binding in a tiny programming language, no box template
  (`let F = apple ; let Q = key ; ... ; print Q : key ; print F : apple ;`, 2-{r['max_vars']}
  variables, every variable printed once in random order, loss on the printed values).
  {ft('organism-goat')['steps']} steps, AdamW lr {r['goat_opt']['lr']}
  ({r['goat_opt']['warmup']} warm-up, cosine), batch {r['goat_opt']['batch']}. Saved as a PEFT
  adapter (`adapter_config.json`, `adapter_model.safetensors`) on top of organism-llama and
  merged at load time by `models.load`, as goat-7b.
- **organism-float**: the same variable-binding fine-tune on all weights,
  {ft('organism-float')['steps']} steps, AdamW lr {r['float_opt']['lr']}.

Fine-tuning seed {r['ft_seed']}. The training streams are seeded apart from the selection
(seed {SELECT_SEED}, and {SELECT_SEED}+n for n-box curriculum checks) and evaluation (seed
{EVAL_SEED}) prompts.

## Time

`make organism` on this machine: {record['wall_s'] / 60:.1f} min wall, {record['cpu_s'] / 60:.1f}
min CPU time (all threads, torch threads = {r['threads']}); base {sum(a['cpu_s'] for a in record['attempts']) / 60:.1f}
CPU min over {len(record['attempts'])} attempt(s), fine-tunes
{sum(record[n]['cpu_s'] for n in ('organism-vicuna', 'organism-goat', 'organism-float')) / 60:.1f}
CPU min. Same seeds and thread count give the same weights on the same machine; another CPU may
round differently and take a different path through the plateau.

`training_log.json` holds every evaluation of the runs.
"""


def replace_dir(new: Path, old: Path) -> None:
    """Swap `new` in for `old` (the previous contents are removed)."""
    if old.exists():
        shutil.rmtree(old)
    new.rename(old)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="directory to (re)write")
    args = parser.parse_args(argv)
    recipe = Recipe()
    torch.set_num_threads(recipe.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    tmp = args.out.with_name(args.out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    record = train_family(recipe, tmp, log=tqdm.write)
    tqdm.write("evaluating on the 500 held-out 7-box prompts (seed 0)")
    acc = evaluate_family(tmp)
    record.update(
        accuracy=acc,
        wall_s=time.perf_counter() - wall,
        cpu_s=time.process_time() - cpu,
        n_params=n_params(tmp / "organism-llama"),
        vocab_size=len(organism_tokenizer()),
    )
    (tmp / "README.md").write_text(model_card(record, acc, tmp))
    (tmp / "training_log.json").write_text(json.dumps(record, indent=1))
    replace_dir(tmp, args.out)
    for name, value in acc.items():
        tqdm.write(f"{name}: 7-box accuracy {value:.3f}")
    tqdm.write(f"wrote {args.out} in {record['wall_s'] / 60:.1f} min ({record['cpu_s'] / 60:.1f} CPU min)")


if __name__ == "__main__":
    main()
