"""Entity-tracking prompts: the paper's template, every carried position, sampling, the path-patching
corruption and the three main desiderata, for word-level and SentencePiece-style tokenizers."""

import random

import pytest

from et_circuits.core.errors import DataError
from et_circuits.tasks.entity_tracking import data
from et_circuits.tasks.entity_tracking.data import Sample
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer

PAPER_PROMPT = (
    "The apple is in Box F, the computer is in Box Q, the document is in Box X, the key is in "
    "Box Y, the bag is in Box E, the map is in Box W, the coffee is in Box B. Box F contains the"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["coffee"])


@pytest.fixture(scope="module")
def vocab(tok):
    return data.vocabulary(tok)


def test_render_is_the_paper_template():
    s = Sample(("apple", "computer", "document", "key", "bag", "map", "coffee"), tuple("FQXYEWB"), 0)
    r = data.render(s)
    assert r.text == PAPER_PROMPT
    for (a, b), obj in zip(r.objects, s.objects):
        assert r.text[a:b] == obj
    assert r.text[slice(*r.query_label)] == "F" and r.query_label[0] > r.labels[-1][0]


def test_paper_prompt_positions(tok):
    s = Sample(("apple", "computer", "document", "key", "bag", "map", "coffee"), tuple("FQXYEWB"), 0)
    b = data.make_prompts(tok, [s])
    toks = tok.convert_ids_to_tokens(b.input_ids[0])
    assert len(toks) == 54 and toks[0] == "<s>"
    assert b.positions["last"].item() == 53 and b.positions["query_label"].item() == 51
    assert (
        toks[b.positions["prev_query_label"].item()] == "F"
        and b.positions["prev_query_label"].item() == b.positions["objects"][0, 0].item() + 4
    )
    assert b.answers.item() == tok.convert_tokens_to_ids("apple")


@pytest.mark.parametrize("n_boxes", [2, 3, 7, 12, 26])
def test_every_carried_position_points_at_its_token(tok, vocab, n_boxes):
    samples = data.sample_prompts(data.Vocabulary(vocab.objects, vocab.labels), 20, n_boxes, seed=n_boxes)
    b = data.make_prompts(tok, samples)
    for i, s in enumerate(samples):
        toks = tok.convert_ids_to_tokens(b.input_ids[i])
        assert [toks[p] for p in b.positions["objects"][i]] == list(s.objects)
        assert [toks[p] for p in b.positions["labels"][i]] == list(s.labels)
        assert toks[b.positions["query_label"][i]] == s.query_label == toks[b.positions["prev_query_label"][i]]
        assert b.positions["prev_query_label"][i] < b.positions["query_label"][i] < b.positions["last"][i]
        assert toks[b.positions["last"][i]] == "the" and b.attention_mask[i, b.positions["last"][i]] == 1
        assert b.answers[i] == b.input_ids[i, b.positions["objects"][i, s.query]]


def test_right_padding_keeps_positions(tok, vocab):
    rng = random.Random(0)
    samples = [data.random_sample(rng, vocab, n) for n in (2, 5, 3)]
    b = data.make_prompts(tok, samples)
    assert b.input_ids.shape[1] == b.positions["last"].max() + 1
    for i, s in enumerate(samples):
        assert b.positions["last"][i] == b.attention_mask[i].sum() - 1
        assert b.input_ids[i, b.positions["objects"][i, s.query]] == b.answers[i]
        assert (b.positions["objects"][i, s.n_boxes :] == -1).all()


def test_sampling_is_seeded_and_distinct(vocab):
    a = data.sample_prompts(vocab, 50, 7, seed=3)
    assert a == data.sample_prompts(vocab, 50, 7, seed=3)
    assert a != data.sample_prompts(vocab, 50, 7, seed=4)
    for s in a:
        assert len(set(s.objects)) == 7 and len(set(s.labels)) == 7


def test_impossible_parameters(vocab):
    with pytest.raises(DataError):
        data.sample_prompts(vocab, 1, 27)
    with pytest.raises(DataError):
        data.sample_prompts(vocab, 1, 1)
    small = data.Vocabulary(vocab.objects[:3], vocab.labels)
    with pytest.raises(DataError, match="usable objects"):
        data.sample_prompts(small, 1, 5)


def test_multi_token_words_are_filtered_and_rejected(tok):
    assert "zeppelin" not in data.vocabulary(tok).objects
    with pytest.raises(DataError, match="single token"):
        data.make_prompts(tok, [Sample(("zeppelin", "apple"), ("A", "B"), 0)])


def test_too_few_usable_words_is_a_clear_error():
    from et_circuits.tasks.entity_tracking.organism import tokenizer as organism_tokenizer

    tok = organism_tokenizer.build_tokenizer()
    with pytest.raises(DataError, match="need at least"):
        data.vocabulary(tok, min_objects=len(data.NOUNS) + 1)


def test_path_patching_corruption(vocab):
    rng = random.Random(0)
    for clean in data.sample_prompts(vocab, 50, 7, seed=1):
        bad = data.path_patching_corruption(clean, rng, vocab)
        assert bad.objects == clean.objects and bad.query != clean.query
        assert bad.answer != clean.answer
        assert bad.labels[clean.query] not in clean.labels  # the queried box's label is new
        assert [l for i, l in enumerate(bad.labels) if i != clean.query] == [
            l for i, l in enumerate(clean.labels) if i != clean.query
        ]


def test_positional_desideratum(vocab):
    for cf in data.counterfactuals(data.positional, vocab, 50, 7, seed=0):
        assert cf.source.query != cf.base.query
        assert cf.target == cf.base.objects[cf.source.query]
        assert not set(cf.source.objects) & set(cf.base.objects)


def test_object_value_desideratum(vocab):
    for cf in data.counterfactuals(data.object_value, vocab, 50, 7, seed=0):
        assert cf.target == cf.source.answer and cf.target not in cf.base.objects
        assert cf.source.query != cf.base.query


def test_box_label_value_desideratum(tok, vocab):
    cfs = data.counterfactuals(data.box_label_value, vocab, 50, 7, seed=0)
    for cf in cfs:
        k = cf.base.labels.index(cf.source.query_label)
        assert k != cf.base.query and cf.source.query not in (k, cf.base.query)
        assert cf.target == cf.base.objects[k]
        assert len(set(cf.source.labels)) == 7
    # the target is tokenized exactly like the base answers: as the object token in context
    base = data.make_prompts(tok, [cf.base for cf in cfs], answers=[cf.target for cf in cfs])
    for i, cf in enumerate(cfs):
        k = cf.base.labels.index(cf.source.query_label)
        assert base.answers[i] == base.input_ids[i, base.positions["objects"][i, k]]


def test_reference_set_queries_vary(vocab):
    ref = data.sample_prompts(vocab, 500, 7, seed=99)
    assert len({s.query for s in ref}) == 7


def sentencepiece_style_tokenizer():
    """A word-level tokenizer with LLaMA's word-start marker (`▁apple`), as the 7B models use."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["The", "the", "is", "in", "Box", "contains", *data.NOUNS, *data.LABELS]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ",": 3, ".": 4}
    for w in words:
        vocab.setdefault("▁" + w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_marker_positions():
    tok = sentencepiece_style_tokenizer()
    s = Sample(("apple", "computer", "document", "key", "bag", "map", "pen"), tuple("FQXYEWB"), 3)
    b = data.make_prompts(tok, [s])
    toks = tok.convert_ids_to_tokens(b.input_ids[0])
    assert len(toks) == 54
    assert [toks[p] for p in b.positions["objects"][0]] == ["▁" + o for o in s.objects]
    assert toks[b.positions["query_label"][0]] == toks[b.positions["prev_query_label"][0]] == "▁Y"
    assert tok.convert_ids_to_tokens([b.answers.item()]) == ["▁key"]
