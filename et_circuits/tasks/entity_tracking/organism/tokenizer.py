"""A word-level tokenizer for the organism, built with the `tokenizers` library."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..data import LABELS, NOUNS

SPECIAL = ["<unk>", "<s>", "</s>"]
TEMPLATE_WORDS = ["The", "the", "is", "in", "Box", "contains", ",", "."]


def build_tokenizer(extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the template, the nouns, the labels and `extra_words`.

    Words split on whitespace and punctuation; BOS `<s>` is prepended to every encoding;
    `</s>` serves as EOS and padding.
    """
    vocab: dict[str, int] = {}
    for word in [*SPECIAL, *TEMPLATE_WORDS, *LABELS, *NOUNS, *extra_words]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        padding_side="right",
    )
