"""Every desideratum's target checked against its definition on the rendered, tokenized prompts,
and the train / eval / test splits."""

import random

import pytest

from et_circuits.core.errors import DataError
from et_circuits.tasks.entity_tracking import data, desiderata
from et_circuits.tasks.entity_tracking.data import Sample
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer
from tests.unit.tasks.test_data import sentencepiece_style_tokenizer

POSITIONAL_LIKE = ["positional"] + [n for n in desiderata.EXTRA if n != "wrong_segment"]


@pytest.fixture(scope="module", params=["word-level", "sentencepiece"])
def tok(request):
    return build_tokenizer() if request.param == "word-level" else sentencepiece_style_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok):
    return data.vocabulary(tok)


def _pairs(name, vocab, n=24, seed=0):
    return desiderata.draw_splits(desiderata.builder(name), vocab, (n, 1, 1), 7, seed).train


def _tokens(tok, batch, i):
    return tok.convert_ids_to_tokens(batch.input_ids[i])


def _check_positions(tok, batch, samples):
    """Carried positions point at the words they name, in whatever template rendered them."""
    for i, s in enumerate(samples):
        toks = [t.lstrip("▁") for t in _tokens(tok, batch, i)]
        assert [toks[p] for p in batch.positions["objects"][i, : s.n_boxes]] == list(s.objects)
        assert [toks[p] for p in batch.positions["labels"][i, : s.n_boxes]] == list(s.labels)
        assert toks[batch.positions["query_label"][i]] == s.query_label == toks[batch.positions["prev_query_label"][i]]
        assert (
            batch.positions["prev_query_label"][i]
            == batch.positions["labels"][i, s.query]
            < batch.positions["query_label"][i]
            < batch.positions["last"][i]
        )


def test_fourteen_desiderata():
    assert len(desiderata.EXTRA) == 11 and len(desiderata.ALL) == 14
    assert desiderata.MAIN == ("positional", "object_value", "box_label_value")
    assert set(desiderata.CONTROLS) <= set(desiderata.EXTRA)


@pytest.mark.parametrize("name", list(desiderata.ALL))
def test_positions_in_base_and_source(tok, vocab, name):
    pairs = _pairs(name, vocab)
    t = desiderata.tokenize_pairs(tok, pairs)
    _check_positions(tok, t.base, [p.base for p in pairs])
    _check_positions(tok, t.source, [p.source for p in pairs])


@pytest.mark.parametrize("name", POSITIONAL_LIKE)
def test_positional_targets(tok, vocab, name):
    """Target = the base object at the source's queried segment index, as tokenized in the base."""
    pairs = _pairs(name, vocab)
    t = desiderata.tokenize_pairs(tok, pairs)
    for i, cf in enumerate(pairs):
        j = cf.source.query
        assert j != cf.base.query and j < cf.base.n_boxes
        assert cf.target == cf.base.objects[j]
        assert t.target[i] == t.base.input_ids[i, t.base.positions["objects"][i, j]]
        assert not set(cf.source.objects) & set(cf.base.objects)


def test_object_value_target(tok, vocab):
    pairs = _pairs("object_value", vocab)
    t = desiderata.tokenize_pairs(tok, pairs)
    for i, cf in enumerate(pairs):
        assert cf.target == cf.source.answer and cf.target not in cf.base.objects
        # the same token as the object inside the source prompt
        assert t.target[i] == t.source.input_ids[i, t.source.positions["objects"][i, cf.source.query]]


def test_box_label_value_target_is_tokenized_like_every_target(tok, vocab):
    """The authors' defect: this target was tokenized differently. Here it is the base object
    bound (by token match) to the source's query label, as that object appears in the base."""
    pairs = _pairs("box_label_value", vocab)
    t = desiderata.tokenize_pairs(tok, pairs)
    for i, cf in enumerate(pairs):
        label_id = t.source.input_ids[i, t.source.positions["query_label"][i]]
        hits = [k for k in range(cf.base.n_boxes) if t.base.input_ids[i, t.base.positions["labels"][i, k]] == label_id]
        assert len(hits) == 1 and hits[0] != cf.base.query
        assert t.target[i] == t.base.input_ids[i, t.base.positions["objects"][i, hits[0]]]
        assert cf.target == cf.base.objects[hits[0]]


def test_wrong_segment_target(tok, vocab):
    pairs = _pairs("wrong_segment", vocab)
    t = desiderata.tokenize_pairs(tok, pairs)
    for i, cf in enumerate(pairs):
        k = cf.base.objects.index(cf.target)
        assert k not in (cf.base.query, cf.source.query)
        assert t.target[i] == t.base.input_ids[i, t.base.positions["objects"][i, k]]


def test_surface_forms(vocab):
    rng = random.Random(0)
    base = data.random_sample(rng, vocab, 7)
    text = {name: data.render(desiderata.builder(name)(base, rng, vocab).source).text for name in desiderata.EXTRA}
    assert text["text_at_start"].startswith(desiderata.TEXT_AT_START + "the ")
    assert desiderata.TEXT_AT_END + "Box " in text["text_at_end"]
    assert text["tokens_between"].count(" is put away safely in Box ") == 7
    assert text["no_commas"].count(",") == 0 and text["more_commas"].count(",") == 13
    assert text["is_not_in"].count(" is not in Box ") == 7
    assert text["segment_order"].startswith("Box ") and text["segment_order"].count(" contains the") == 8
    counts = {
        n: data.render(desiderata.builder(n)(base, rng, vocab).source).text.count(" in Box ")
        for n in ("segment_at_start", "segment_at_end", "boxes_before")
    }
    assert counts == {"segment_at_start": 8, "segment_at_end": 8, "boxes_before": 9}


def test_segment_order_renders_label_first(tok):
    s = Sample(("apple", "key", "map"), ("B", "O", "X"), 0, data.Template(segment=desiderata.SEGMENT_REVERSED))
    assert data.render(s).text == (
        "Box B contains the apple, Box O contains the key, Box X contains the map. Box B contains the"
    )
    b = data.make_prompts(tok, [s])
    _check_positions(tok, b, [s])
    assert b.positions["labels"][0, 0] < b.positions["objects"][0, 0]  # label before its object
    assert b.positions["objects"][0, 0] == b.positions["labels"][0, 0] + 3


def test_query_label_is_found_by_token_not_substring(tok, vocab):
    """The authors' defect: `B` matched inside `Box`. Labels B and O sit next to every `Box`."""
    rng = random.Random(1)
    base = Sample(tuple(rng.sample(vocab.objects, 7)), ("O", "X", "B", "C", "D", "E", "F"), 2)
    for name in desiderata.ALL:
        cf = desiderata.builder(name)(base, rng, vocab)
        t = desiderata.tokenize_pairs(tok, [cf])
        toks = [x.lstrip("▁") for x in _tokens(tok, t.base, 0)]
        assert toks[t.base.positions["query_label"][0]] == "B" and toks[t.base.positions["prev_query_label"][0]] == "B"
        assert t.base.positions["prev_query_label"][0] == t.base.positions["labels"][0, 2]


def test_splits_are_seeded_disjoint_and_share_bases(vocab):
    a = desiderata.draw_splits(desiderata.positional, vocab, (40, 20, 20), 7, seed=3)
    assert (len(a.train), len(a.eval), len(a.test)) == (40, 20, 20)
    bases = [p.base for p in a.train + a.eval + a.test]
    assert len(set(bases)) == 80  # no base prompt in two splits (nor twice in one)
    assert a == desiderata.draw_splits(desiderata.positional, vocab, (40, 20, 20), 7, seed=3)
    assert a.train != desiderata.draw_splits(desiderata.positional, vocab, (40, 20, 20), 7, seed=4).train
    other = desiderata.draw_splits(data.object_value, vocab, (40, 20, 20), 7, seed=3)
    assert [p.base for p in other.train + other.eval + other.test] == bases  # paired across desiderata
    assert [p.source for p in other.train] != [p.source for p in a.train]


def test_impossible_splits(vocab):
    with pytest.raises(DataError, match="three positive"):
        desiderata.draw_splits(desiderata.positional, vocab, (10, 0, 5))
    small = data.Vocabulary(vocab.objects[:4], vocab.labels[:3])  # 144 distinct 2-box bases
    with pytest.raises(DataError, match="distinct base prompts"):
        desiderata.draw_splits(desiderata.positional, small, (150, 20, 20), n_boxes=2)
    with pytest.raises(DataError, match="3 boxes"):
        desiderata.draw_splits(desiderata.wrong_segment, vocab, (5, 5, 5), n_boxes=2)
    with pytest.raises(DataError, match="unknown desideratum"):
        desiderata.builder("colour")
