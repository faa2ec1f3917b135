"""Entity-tracking prompts: structured samples, the paper's template, tokenized prompt sets
and counterfactual builders.

A prompt is never edited as a string: every variant is a `Sample` (objects, labels, query index,
template) rendered afresh, and the token positions are computed here, once, from the character
spans of the rendering (so the same code serves SentencePiece and word-level tokenizers). They
travel with the prompts as the `PromptSet`'s named positions (`POSITIONS`).
"""

from __future__ import annotations

import dataclasses
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from et_circuits.core.errors import DataError
from et_circuits.core.prompts import PromptSet

LABELS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# The project's own list of common concrete nouns (one word each, lower case).
# fmt: off
NOUNS: tuple[str, ...] = (
    "apple", "bag", "ball", "bell", "belt", "bike", "boat", "bone", "book", "boot",
    "bottle", "bowl", "brick", "brush", "bucket", "cake", "camera", "candle", "car", "card",
    "chair", "clock", "coat", "coin", "comb", "computer", "cookie", "cup", "desk", "dish",
    "document", "doll", "door", "drum", "egg", "engine", "fan", "flag", "flower", "fork",
    "glass", "glove", "guitar", "hammer", "hat", "horn", "jacket", "jar", "key", "kite",
    "knife", "ladder", "lamp", "leaf", "letter", "lock", "map", "mask", "medal", "milk",
    "mirror", "mouse", "nail", "needle", "note", "orange", "paint", "pan", "paper", "pen",
    "pencil", "phone", "piano", "pillow", "pipe", "plate", "plant", "radio", "ring", "rope",
    "ruler", "salt", "scarf", "shell", "shirt", "shoe", "sock", "spoon", "stamp", "stone",
    "table", "ticket", "towel", "toy", "train", "tree", "umbrella", "vase", "wallet", "watch",
    "wheel", "whistle", "window", "wire",
)
# fmt: on


@dataclass(frozen=True)
class Template:
    """How a sample is rendered. The default is the paper's template exactly."""

    segment: str = "the {object} is in Box {label}"
    separator: str = ", "
    prefix: str = ""
    context_end: str = ". "
    query: str = "Box {label} contains the"
    suffix: str = ""  # text after the context, before the query


PAPER_TEMPLATE = Template()


@dataclass(frozen=True)
class Sample:
    """One entity-tracking prompt: box i holds objects[i] and is labelled labels[i]."""

    objects: tuple[str, ...]
    labels: tuple[str, ...]
    query: int
    template: Template = field(default=PAPER_TEMPLATE)

    def __post_init__(self) -> None:
        if len(self.objects) != len(self.labels):
            raise DataError("objects and labels differ in number")
        if not 0 <= self.query < len(self.objects):
            raise DataError(f"query index {self.query} outside {len(self.objects)} boxes")
        if len(set(self.objects)) != len(self.objects) or len(set(self.labels)) != len(self.labels):
            raise DataError("objects and labels must be distinct within a prompt")

    @property
    def n_boxes(self) -> int:
        return len(self.objects)

    @property
    def query_label(self) -> str:
        return self.labels[self.query]

    @property
    def answer(self) -> str:
        return self.objects[self.query]

    def replace(self, **changes) -> Sample:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Rendering:
    """A sample's text and the character spans of the words whose positions we track."""

    text: str
    objects: tuple[tuple[int, int], ...]
    labels: tuple[tuple[int, int], ...]
    query_label: tuple[int, int]


def render(sample: Sample) -> Rendering:
    """Render with the sample's template, recording where each object and label sits."""
    t = sample.template
    text = t.prefix
    objects, labels = [], []
    for i, (obj, lab) in enumerate(zip(sample.objects, sample.labels)):
        if i:
            text += t.separator
        segment = t.segment
        if i == 0 and not t.prefix.strip():
            segment = segment[0].upper() + segment[1:]
        text, spans = _fill(text, segment, object=obj, label=lab)
        objects.append(spans["object"])
        labels.append(spans["label"])
    text += t.context_end + t.suffix
    text, spans = _fill(text, t.query, label=sample.query_label)
    return Rendering(text, tuple(objects), tuple(labels), spans["label"])


def _fill(text: str, fmt: str, **values: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Append `fmt` with its {fields} filled in; return the new text and each field's span."""
    spans = {}
    rest = fmt
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        text += head
        spans[name] = (len(text), len(text) + len(values[name]))
        text += values[name]
    return text + rest, spans


# ---------------------------------------------------------------------------------------------
# Tokenization


def _token_index(offsets: Sequence[tuple[int, int]], span: tuple[int, int], text: str) -> int:
    """Index of the single token covering `span`; DataError if the word is not one token."""
    s, e = span
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s]
    if len(hits) != 1:
        raise DataError(f"{text[s:e]!r} is not a single token in this tokenizer")
    a, b = offsets[hits[0]]
    if text[a:s].strip() or b > e:
        raise DataError(f"{text[s:e]!r} merges with its neighbours in this tokenizer")
    return hits[0]


def encode(tokenizer, sample: Sample) -> dict:
    """Token ids of one sample (with BOS) and the positions of its tracked words."""
    r = render(sample)
    enc = tokenizer(r.text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if tokenizer.bos_token_id is not None and ids[0] != tokenizer.bos_token_id:
        ids, offsets = [tokenizer.bos_token_id] + ids, [(0, 0)] + list(offsets)
    objects = [_token_index(offsets, sp, r.text) for sp in r.objects]
    labels = [_token_index(offsets, sp, r.text) for sp in r.labels]
    unknown = [w for w, p in zip(sample.objects + sample.labels, objects + labels) if ids[p] == tokenizer.unk_token_id]
    if unknown:
        raise DataError(f"{unknown[0]!r} is not a single token in this tokenizer (unknown word)")
    return {
        "input_ids": ids,
        "objects": objects,
        "labels": labels,
        "query_label": _token_index(offsets, r.query_label, r.text),
        "prev_query_label": labels[sample.query],
        "last": len(ids) - 1,
    }


def object_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Token id of each object word in the form it takes inside a prompt (after `the `).

    Every answer and every counterfactual target goes through this one function, so all
    targets are tokenized alike.
    """
    known = _OBJECT_IDS.setdefault(tokenizer, {})  # each word is tokenized once per tokenizer
    for word in set(words) - known.keys():
        enc = encode(tokenizer, Sample((word,), ("A",), 0))
        known[word] = enc["input_ids"][enc["objects"][0]]
    return [known[word] for word in words]


_OBJECT_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Vocabulary:
    """Objects and labels usable with one tokenizer (single tokens where they appear)."""

    objects: tuple[str, ...]
    labels: tuple[str, ...]


def vocabulary(tokenizer, min_objects: int = 7, min_labels: int = 7) -> Vocabulary:
    """Filter NOUNS and LABELS to those that are single tokens in the prompt's form."""
    objects, labels = [], []
    for word in NOUNS:
        try:
            object_token_ids(tokenizer, [word])
            objects.append(word)
        except DataError:
            pass
    for lab in LABELS:
        try:
            encode(tokenizer, Sample(("apple", "key"), ("A" if lab != "A" else "B", lab), 1))
            labels.append(lab)
        except DataError:
            pass
    if len(objects) < min_objects or len(labels) < min_labels:
        raise DataError(
            f"only {len(objects)} objects and {len(labels)} labels are single tokens for this "
            f"tokenizer; need at least {min_objects} and {min_labels}"
        )
    return Vocabulary(tuple(objects), tuple(labels))


# The positions every entity-tracking PromptSet carries, besides "last": single positions, and
# position sets with one entry per box (-1 where a prompt has fewer boxes than the widest).
POSITIONS = {
    "query_label": "the label in the query (Box <L> contains the)",
    "prev_query_label": "the query label's occurrence in the context (its box's segment)",
    "answer_object": "the queried box's object in the context",
    "labels": "every box's label (a position set)",
    "objects": "every box's object (a position set)",
}


def make_prompts(tokenizer, samples: Sequence[Sample], answers: Sequence[str] | None = None) -> PromptSet:
    """Tokenize samples (right-padded) into a PromptSet with the positions in `POSITIONS`;
    `answers` overrides the target word of each (default: the queried object)."""
    if not samples:
        raise DataError("no samples to tokenize")
    encs = [encode(tokenizer, s) for s in samples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seq = max(len(e["input_ids"]) for e in encs)
    boxes = max(len(e["objects"]) for e in encs)
    ids = torch.full((len(encs), seq), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(encs), seq), dtype=torch.long)
    objects = torch.full((len(encs), boxes), -1, dtype=torch.long)
    labels = torch.full((len(encs), boxes), -1, dtype=torch.long)
    for i, e in enumerate(encs):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        objects[i, : len(e["objects"])] = torch.tensor(e["objects"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    words = list(answers) if answers is not None else [s.answer for s in samples]
    positions = {
        "last": torch.tensor([e["last"] for e in encs]),
        "query_label": torch.tensor([e["query_label"] for e in encs]),
        "prev_query_label": torch.tensor([e["prev_query_label"] for e in encs]),
        "answer_object": torch.tensor([e["objects"][s.query] for e, s in zip(encs, samples)]),
        "labels": labels,
        "objects": objects,
    }
    return PromptSet(ids, torch.tensor(object_token_ids(tokenizer, words)), positions, mask)


# ---------------------------------------------------------------------------------------------
# Sampling and counterfactuals


def random_sample(
    rng: random.Random,
    vocab: Vocabulary,
    n_boxes: int = 7,
    query: int | None = None,
    template: Template = PAPER_TEMPLATE,
    exclude_objects: Sequence[str] = (),
) -> Sample:
    """A sample with distinct random objects and labels; random query index unless given."""
    if not 2 <= n_boxes <= 26:
        raise DataError(f"n_boxes must be between 2 and 26, got {n_boxes}")
    pool = [o for o in vocab.objects if o not in set(exclude_objects)]
    if len(pool) < n_boxes or len(vocab.labels) < n_boxes:
        raise DataError(
            f"{n_boxes} boxes need {n_boxes} objects and labels; this tokenizer has "
            f"{len(pool)} usable objects and {len(vocab.labels)} labels"
        )
    objects = tuple(rng.sample(pool, n_boxes))
    labels = tuple(rng.sample(vocab.labels, n_boxes))
    q = rng.randrange(n_boxes) if query is None else query
    return Sample(objects, labels, q, template)


def sample_prompts(vocab: Vocabulary, n: int, n_boxes: int = 7, seed: int = 0) -> list[Sample]:
    """`n` seeded samples with a random query index each (also the mean-ablation reference set)."""
    rng = random.Random(seed)
    return [random_sample(rng, vocab, n_boxes) for _ in range(n)]


def _other_index(rng: random.Random, n: int, *avoid: int) -> int:
    choices = [i for i in range(n) if i not in avoid]
    if not choices:
        raise DataError("not enough boxes for this counterfactual")
    return rng.choice(choices)


def _fresh_label(rng: random.Random, vocab: Vocabulary, used: Sequence[str]) -> str:
    choices = [lab for lab in vocab.labels if lab not in set(used)]
    if not choices:
        raise DataError("no unused label left for the counterfactual")
    return rng.choice(choices)


@dataclass(frozen=True)
class Counterfactual:
    """A base prompt, a source prompt, and the target word the desideratum predicts when
    the patched component carries the information it tests."""

    base: Sample
    source: Sample
    target: str


def path_patching_corruption(clean: Sample, rng: random.Random, vocab: Vocabulary) -> Sample:
    """The corrupt run of path patching: the queried box's label is replaced by a random unused
    letter and the query asks a different box, so the answer changes and every sender position
    (previous query label, query label, last token) sees different input."""
    j = _other_index(rng, clean.n_boxes, clean.query)
    labels = list(clean.labels)
    labels[clean.query] = _fresh_label(rng, vocab, clean.labels)
    return clean.replace(labels=tuple(labels), query=j)


def positional(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source queries another position (with other objects and labels); if the patched heads
    carry the query's position, the model answers the base object at the source's position."""
    j = _other_index(rng, base.n_boxes, base.query)
    source = random_sample(rng, vocab, base.n_boxes, j, base.template, base.objects)
    return Counterfactual(base, source, base.objects[j])


def object_value(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source has other objects and queries another position; if the patched heads carry the
    object itself, the model answers the source's answer."""
    j = _other_index(rng, base.n_boxes, base.query)
    source = random_sample(rng, vocab, base.n_boxes, j, base.template, base.objects)
    return Counterfactual(base, source, source.answer)


def box_label_value(base: Sample, rng: random.Random, vocab: Vocabulary) -> Counterfactual:
    """Source's query label is the label of another base box k, placed at a source position j
    that is neither k nor the base query; if the heads carry the label, the answer is base
    object k."""
    k = _other_index(rng, base.n_boxes, base.query)
    j = _other_index(rng, base.n_boxes, base.query, k)
    source = random_sample(rng, vocab, base.n_boxes, j, base.template, base.objects)
    labels = [lab for lab in source.labels if lab != base.labels[k]]
    while len(labels) < base.n_boxes:  # the label moved away from another source box
        labels.append(_fresh_label(rng, vocab, labels + [base.labels[k]]))
    labels = labels[: base.n_boxes]
    labels[j] = base.labels[k]
    return Counterfactual(base, source.replace(labels=tuple(labels)), base.objects[k])


DESIDERATA = {
    "positional": positional,
    "object_value": object_value,
    "box_label_value": box_label_value,
}


def counterfactuals(builder, vocab: Vocabulary, n: int, n_boxes: int = 7, seed: int = 0) -> list[Counterfactual]:
    """`n` seeded counterfactual triples from one builder."""
    rng = random.Random(seed)
    return [builder(random_sample(rng, vocab, n_boxes), rng, vocab) for _ in range(n)]
