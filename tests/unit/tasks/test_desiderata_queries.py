"""Which segment each desideratum's source may query, and how many boxes it shows, read off the
paper's descriptions (base of 4 boxes): every generated source queries an allowed index, never
the base's own, and over many samples every allowed index occurs (neither narrower nor wider)."""

from __future__ import annotations

import random

import pytest

from et_circuits.tasks.entity_tracking import data, desiderata
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer

N = 4  # boxes of the base
# desideratum -> (boxes of the source, indices its query may take besides "not the base's")
RULES = {
    "positional": (N, range(N)),
    "object_value": (N, range(N)),
    "box_label_value": (N, range(N)),  # and not the box whose label it carries (below)
    "text_at_start": (N, range(N)),
    "text_at_end": (N, range(N)),
    "segment_at_start": (N + 1, range(1, N)),  # never the extra segment in front
    "segment_at_end": (N + 1, range(N)),  # never the extra segment at the end
    "tokens_between": (N, range(N)),
    "boxes_before": (N + 2, range(2, N)),  # both extra boxes before the queried one
    "segment_order": (N, range(N)),
    "no_commas": (N, range(N)),
    "more_commas": (N, range(N)),
    "is_not_in": (N, range(N)),
    "wrong_segment": (N, range(N)),
}


@pytest.fixture(scope="module")
def vocab():
    return data.vocabulary(build_tokenizer())


def test_every_desideratum_has_a_rule():
    assert set(RULES) == set(desiderata.ALL)


@pytest.mark.parametrize("name", list(RULES))
def test_source_queries_only_the_allowed_segments(vocab, name):
    boxes, allowed = RULES[name]
    rng = random.Random(f"queries-{name}")
    build = desiderata.builder(name)
    seen = set()
    for _ in range(120):
        base = data.random_sample(rng, vocab, N)
        cf = build(base, rng, vocab)
        j = cf.source.query
        assert cf.source.n_boxes == boxes and cf.base == base
        assert j in allowed and j != base.query, (j, base.query)
        if name == "box_label_value":
            k = base.labels.index(cf.source.labels[j])
            assert k not in (j, base.query) and cf.target == base.objects[k]
        seen.add(j)
    assert seen == set(allowed)
