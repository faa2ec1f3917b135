"""Desiderata for DCM: the three main ones (in `data.py`) and the eleven extra ones the paper
used for group B, seeded train / eval / test splits without overlap, and their tokenization
into `dcm.Pairs`.

A desideratum is a builder `(base, rng, vocab) -> Counterfactual(base, source, target)` on
structured samples: the source is a freshly rendered `Sample` (possibly with another template or
another number of boxes), never an edited string, so `data.make_prompts` finds every position in
both prompts. `target` is the word the model should answer on the base prompt when the patched
heads carry exactly the information the desideratum names; it is tokenized, like every answer,
by `data.object_token_ids`.

The extra desiderata all test one hypothesis about group B: that it carries the ordinal of the
correct segment, counted from the start of the context over every segment the source shows. Each
changes the source's surface (text, segment count, segment form, punctuation) and predicts the base
object at the source's queried segment index, `base.objects[source.query]`; that index is always
a base box other than the base's own answer. The two controls predict what a positional signal
should *not* give: `is_not_in` states no location at all, and `wrong_segment` predicts a third
segment, so high accuracy on them would speak against a purely positional reading.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from et_circuits.core.errors import DataError
from et_circuits.core.prompts import PromptSet
from et_circuits.methods.dcm import Pairs

from .data import (
    DESIDERATA,
    Counterfactual,
    Sample,
    Template,
    Vocabulary,
    make_prompts,
    object_token_ids,
    positional,
    random_sample,
)
from .paper import DCM_SPLIT_SIZES

Builder = Callable[[Sample, random.Random, Vocabulary], Counterfactual]

MAIN: tuple[str, ...] = tuple(DESIDERATA)  # positional, object_value, box_label_value

# Surface text of the extra desiderata (plain English, so a 7B model reads it as text).
TEXT_AT_START = "Here is a list of things and the boxes they are in: "
TEXT_AT_END = "Each box holds exactly one thing. "
SEGMENT_WITH_TOKENS_BETWEEN = "the {object} is put away safely in Box {label}"
SEGMENT_REVERSED = "Box {label} contains the {object}"
SEGMENT_WITH_COMMA = "the {object}, is in Box {label}"
SEGMENT_NEGATED = "the {object} is not in Box {label}"


def _positional_source(
    base: Sample,
    rng: random.Random,
    vocab: Vocabulary,
    template: Template | None = None,
    n_boxes: int | None = None,
    queries: Iterable[int] | None = None,
) -> Counterfactual:
    """A source rendered with `template`, with `n_boxes` boxes and new objects, querying one of
    `queries` (segment indices that exist in the base, never the base's own query); the target
    is the base object at that index."""
    n = base.n_boxes if n_boxes is None else n_boxes
    allowed = range(min(n, base.n_boxes)) if queries is None else queries
    choices = [j for j in allowed if j != base.query and 0 <= j < min(n, base.n_boxes)]
    if not choices:
        raise DataError(f"no source query index fits this desideratum with {base.n_boxes} boxes")
    j = rng.choice(choices)
    source = random_sample(rng, vocab, n, j, template or base.template, base.objects)
    return Counterfactual(base, source, base.objects[j])


def _variant(base: Sample, **changes: str) -> Template:
    return dataclasses.replace(base.template, **changes)


def text_at_start(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source opens with a sentence before the first segment (token positions shift, segment
    indices do not)."""
    return _positional_source(base, rng, vocab, _variant(base, prefix=TEXT_AT_START))


def text_at_end(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source has a sentence between the context and the query."""
    return _positional_source(base, rng, vocab, _variant(base, suffix=TEXT_AT_END))


def segment_at_start(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source has one box more than the base, an extra segment in front; its correct segment is
    never that first one, and the target counts it (index j in the source -> base object j)."""
    return _positional_source(base, rng, vocab, n_boxes=base.n_boxes + 1, queries=range(1, base.n_boxes))


def segment_at_end(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source has one box more than the base, an extra segment at the end that is never queried."""
    return _positional_source(base, rng, vocab, n_boxes=base.n_boxes + 1, queries=range(base.n_boxes))


def boxes_before(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source has two boxes more than the base, both before its correct segment (so that
    segment is at index >= 2, counted with the extra boxes)."""
    return _positional_source(base, rng, vocab, n_boxes=base.n_boxes + 2, queries=range(2, base.n_boxes))


def tokens_between(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source segments have extra words between the object and its box."""
    return _positional_source(base, rng, vocab, _variant(base, segment=SEGMENT_WITH_TOKENS_BETWEEN))


def segment_order(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source segments read `Box L contains the obj` (label before object)."""
    return _positional_source(base, rng, vocab, _variant(base, segment=SEGMENT_REVERSED))


def no_commas(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source segments are joined by a space instead of `, `."""
    return _positional_source(base, rng, vocab, _variant(base, separator=" "))


def more_commas(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source segments carry an extra comma after the object."""
    return _positional_source(base, rng, vocab, _variant(base, segment=SEGMENT_WITH_COMMA))


def is_not_in(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Control: source segments say `is not in`, so the source locates nothing; the target is
    still the positional one."""
    return _positional_source(base, rng, vocab, _variant(base, segment=SEGMENT_NEGATED))


def wrong_segment(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Control: a positional source, but the target is the base object of a third segment
    (neither the base's nor the source's queried index)."""
    cf = positional(base, rng, vocab)
    choices = [k for k in range(base.n_boxes) if k not in (base.query, cf.source.query)]
    if not choices:
        raise DataError("wrong_segment needs at least 3 boxes")
    return dataclasses.replace(cf, target=base.objects[rng.choice(choices)])


EXTRA: dict[str, Builder] = {
    "text_at_start": text_at_start,
    "text_at_end": text_at_end,
    "segment_at_start": segment_at_start,
    "segment_at_end": segment_at_end,
    "tokens_between": tokens_between,
    "boxes_before": boxes_before,
    "segment_order": segment_order,
    "no_commas": no_commas,
    "more_commas": more_commas,
    "is_not_in": is_not_in,
    "wrong_segment": wrong_segment,
}
CONTROLS: tuple[str, ...] = ("is_not_in", "wrong_segment")
ALL: dict[str, Builder] = {**DESIDERATA, **EXTRA}


def builder(name: str) -> Builder:
    """The builder of a named desideratum; DataError naming the known ones otherwise."""
    if name not in ALL:
        raise DataError(f"unknown desideratum {name!r}; known: {', '.join(ALL)}")
    return ALL[name]


# ---------------------------------------------------------------------------------------------
# Splits

SPLIT_SIZES = DCM_SPLIT_SIZES  # the paper's train / eval / test


@dataclass(frozen=True)
class Splits:
    """Counterfactual pairs for mask training, mask selection and the reported accuracy."""

    train: list[Counterfactual]
    eval: list[Counterfactual]
    test: list[Counterfactual]


def draw_bases(vocab: Vocabulary, n: int, n_boxes: int = 7, seed: int = 0) -> list[Sample]:
    """`n` seeded base prompts, all distinct (objects, labels and query)."""
    if n <= 0:
        raise DataError(f"the number of prompts must be positive, got {n}")
    rng = random.Random(seed)
    seen: set[Sample] = set()
    bases: list[Sample] = []
    draws = 0
    while len(bases) < n:
        draws += 1
        if draws > 10 * n + 100:
            raise DataError(f"could not draw {n} distinct base prompts with {n_boxes} boxes from this vocabulary")
        base = random_sample(rng, vocab, n_boxes)
        if base not in seen:
            seen.add(base)
            bases.append(base)
    return bases


def draw_splits(
    build: Builder,
    vocab: Vocabulary,
    sizes: Sequence[int] = SPLIT_SIZES,
    n_boxes: int = 7,
    seed: int = 0,
) -> Splits:
    """Seeded train / eval / test pairs whose base prompts are all distinct, so no prompt is in
    two splits. The base prompts depend on `seed` only, not on the desideratum, so every
    desideratum is measured on the same bases (paired comparisons, one base pass for all); the
    sources are drawn from a generator seeded by `seed` and the builder's name."""
    if len(sizes) != 3 or any(int(n) <= 0 for n in sizes):
        raise DataError(f"split sizes must be three positive numbers, got {tuple(sizes)}")
    bases = draw_bases(vocab, sum(sizes), n_boxes, seed)
    rng = random.Random(f"{seed}:{build.__name__}")
    pairs = [build(base, rng, vocab) for base in bases]
    a, b = sizes[0], sizes[0] + sizes[1]
    return Splits(pairs[:a], pairs[a:b], pairs[b:])


def tokenize_pairs(
    tokenizer, pairs: Sequence[Counterfactual], bases: tuple[Sequence[Sample], PromptSet] | None = None
) -> Pairs:
    """`dcm.Pairs` of counterfactuals: base prompts answering the desideratum's target, and
    their sources. `bases` = (samples, their PromptSet) reuses a tokenization of the very same
    base samples (desiderata drawn by `draw_splits` with one seed share their bases), so
    every desideratum's pairs share one base tensor and DCM runs those prompts once."""
    words = sorted({p.target for p in pairs})
    ids = dict(zip(words, object_token_ids(tokenizer, words)))
    target = torch.tensor([ids[p.target] for p in pairs])
    if bases is None:
        base = make_prompts(tokenizer, [p.base for p in pairs])
    else:
        samples, base = bases
        if list(samples) != [p.base for p in pairs]:
            raise DataError("the given base prompts are not these pairs' bases")
    return Pairs(base.replace(answers=target), make_prompts(tokenizer, [p.source for p in pairs]))
