"""The recipe's prompt sets: every set is drawn with `seed + SEED_OFFSETS[purpose]`, so the sets
of different purposes differ and a rerun with the same seed reproduces them."""

from __future__ import annotations

import random

from et_circuits.core.prompts import PromptSet

from .. import data

# Each purpose draws its prompts with seed + offset, apart from the others.
SEED_OFFSETS = {
    "path_patching": 0,
    "minimality": 1,
    "reference": 2,
    "evaluation": 3,
    "dcm": 4,
    "cmap": 5,
    "knockout": 6,
}


def prompts(tokenizer, vocab: data.Vocabulary, n: int, n_boxes: int, seed: int) -> PromptSet:
    """`n` seeded prompts with a random query each."""
    return data.make_prompts(tokenizer, data.sample_prompts(vocab, n, n_boxes, seed))


def path_patching_prompts(
    tokenizer, vocab: data.Vocabulary, n: int, n_boxes: int = 7, seed: int = 0
) -> tuple[PromptSet, PromptSet]:
    """`n` seeded clean prompts and their corruptions (same length, so positions line up)."""
    clean = data.sample_prompts(vocab, n, n_boxes, seed)
    rng = random.Random(f"path-patching-corruption-{seed}")
    corrupt = [data.path_patching_corruption(s, rng, vocab) for s in clean]
    return data.make_prompts(tokenizer, clean), data.make_prompts(tokenizer, corrupt)


def prompts_for(purpose: str, tokenizer, n: int, n_boxes: int, seed: int) -> PromptSet:
    """`n` seeded prompts of `n_boxes` boxes for one purpose of SEED_OFFSETS (drawn with seed +
    its offset), from the objects and labels that are single tokens for `tokenizer`."""
    vocab = data.vocabulary(tokenizer, min_objects=n_boxes, min_labels=n_boxes)
    return prompts(tokenizer, vocab, n, n_boxes, seed + SEED_OFFSETS[purpose])
