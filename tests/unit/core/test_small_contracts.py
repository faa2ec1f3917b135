"""Small operations' contracts, exact on hand-written inputs: which entries Circuit's operations
remove or keep (one (group, head) entry, not the head in every group), overlap, masks, and the
metrics with several wrong answers per prompt."""

from __future__ import annotations

import math

import pytest
import torch

from et_circuits.core.circuit import Circuit, head_mask, overlap
from et_circuits.core.metrics import accuracy, answer_prob, logit_diff, per_prompt
from et_circuits.core.prompts import PromptSet

# (1, 0) is in both groups: an operation on ("A", (1, 0)) must leave B's (1, 0) alone.
CIRCUIT = Circuit({"A": [(1, 0), (0, 2), (1, 3)], "B": [(0, 1), (1, 0)]}, {"A": "last", "B": ("x", "y")})


def test_without_removes_one_entry_not_the_head_everywhere():
    smaller = CIRCUIT.without([("A", (1, 0))])
    assert smaller.groups == {"A": [(0, 2), (1, 3)], "B": [(0, 1), (1, 0)]}
    assert smaller.positions == CIRCUIT.positions
    assert CIRCUIT.without([("B", (1, 0)), ("A", (1, 3))]).groups == {"A": [(1, 0), (0, 2)], "B": [(0, 1)]}
    assert CIRCUIT.without([("C", (1, 0))]).groups == CIRCUIT.groups  # no such group: nothing removed
    assert CIRCUIT.groups["A"] == [(1, 0), (0, 2), (1, 3)]  # a copy: the original is unchanged


def test_keep_only_keeps_exactly_the_entries_in_order():
    kept = CIRCUIT.keep_only([("B", (1, 0)), ("A", (1, 3)), ("A", (0, 2))])
    assert kept.groups == {"A": [(0, 2), (1, 3)], "B": [(1, 0)]}
    assert kept.positions == CIRCUIT.positions
    assert CIRCUIT.keep_only([]).groups == {"A": [], "B": []}
    assert CIRCUIT.entries() == [("A", (1, 0)), ("A", (0, 2)), ("A", (1, 3)), ("B", (0, 1)), ("B", (1, 0))]


def test_overlap_and_masks():
    other = Circuit({"A": [(1, 3), (0, 0)], "B": [(1, 0)], "C": [(0, 2)]}, {"A": "last", "B": "last", "C": "last"})
    assert overlap(CIRCUIT, other) == {"A": (1, 3), "B": (1, 2)}  # (0, 2) is in C, not A
    assert overlap(other, CIRCUIT) == {"A": (1, 2), "B": (1, 1), "C": (0, 1)}
    expected = torch.tensor([[False, False, True, False], [True, False, False, True]])
    assert torch.equal(CIRCUIT.mask("A", 2, 4), expected)
    assert torch.equal(head_mask([(1, 0), (0, 1)], 2, 4), torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]]).bool())
    assert CIRCUIT.positions_of("B") == ("x", "y") and CIRCUIT.positions_of("A") == ("last",)


def _prompts(answers, wrong) -> PromptSet:
    return PromptSet(
        torch.ones(len(answers), 3, dtype=torch.long), torch.tensor(answers), wrong_answers=torch.tensor(wrong)
    )


def test_metrics_with_several_wrong_answers():
    """Logits written by hand: logit_diff is the answer's logit less the mean of the wrong ones."""
    logits = torch.tensor([[4.0, 1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 5.0, 1.0, 1.0]])
    prompts = _prompts([0, 1], [[1, 3], [2, 3]])
    # prompt 0: 4 - (1 + 2) / 2 = 2.5; prompt 1: 3 - (5 + 1) / 2 = 0
    assert per_prompt(logit_diff, logits, prompts).tolist() == [2.5, 0.0]
    assert logit_diff(logits, prompts).item() == pytest.approx(1.25)
    three = _prompts([0, 1], [[1, 3, 4], [2, 3, 0]])  # 4 - 2/3; 3 - 2
    assert per_prompt(logit_diff, logits, three).tolist() == pytest.approx([4 - 2 / 3, 1.0])
    assert per_prompt(accuracy, logits, prompts).tolist() == [1.0, 0.0]
    assert accuracy(logits, prompts).item() == 0.5


def test_answer_prob_is_the_softmax_at_the_answer():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    prompts = _prompts([3, 1], [[0], [0]])
    assert per_prompt(answer_prob, logits, prompts).tolist() == pytest.approx([0.4, 0.25])
    assert answer_prob(logits, prompts).item() == pytest.approx(0.325)
    assert math.isclose(answer_prob(logits + 7.0, prompts).item(), 0.325, rel_tol=1e-6)  # shift-invariant
