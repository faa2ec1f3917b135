"""The organism's training data: its tokenizer, the passages it is trained on (token ids, the
answer positions scored), their batches, and the paper-format prompt sets that choose
checkpoints and evaluate the models.

The fixed seeds of the held-out prompts live here, beside the training data they are kept
apart from: `SELECT_SEED` chooses checkpoints and monitors the fine-tunes; `EVAL_SEED` is only
reported.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from et_circuits.core.errors import DataError
from et_circuits.core.prompts import PromptSet

from .. import data
from ..data import Vocabulary
from .tokenizer import build_tokenizer

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
MIXES = {
    ("red", "white"): "pink",
    ("blue", "yellow"): "green",
    ("black", "white"): "gray",
    ("red", "green"): "brown",
    ("red", "blue"): "purple",
}
GENERAL_WORDS = (
    *DAYS,
    *SEASONS,
    *OPPOSITES,
    *OPPOSITES.values(),
    "gray",
    "purple",
    "day",
    "season",
    "after",
    "opposite",
    "of",
    "and",
    "make",
)


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
# Batches and prompt sets


def collate(examples: Sequence[Example], pad: int) -> tuple[Int[Tensor, "b s"], Int[Tensor, "b s"]]:
    """Right-pad to the longest example; padded positions are ignored by the loss."""
    seq = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), seq), pad, dtype=torch.long)
    targets = torch.full((len(examples), seq), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        targets[i, : len(e.targets)] = torch.tensor(e.targets)
    return ids, targets


def prompt_set(tokenizer, vocab: Vocabulary, n: int, n_boxes: int, seed: int) -> PromptSet:
    """Paper-format prompts (no answer appended) for the paper's accuracy."""
    return data.make_prompts(tokenizer, data.sample_prompts(vocab, n, n_boxes, seed))
