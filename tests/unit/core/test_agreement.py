"""Spearman and top-k recall of an estimate against exact scores: over the entries both score,
ties at their average rank; recall counts the exact top-k (most negative) among the estimate's
top-N by magnitude."""

from __future__ import annotations

import math

import torch

from et_circuits.core.agreement import spearman, top_k_recall


def test_spearman_ranks_over_the_entries_both_score():
    exact = torch.tensor([[-3.0, -1.0], [0.5, 2.0]])
    assert spearman(exact**3, exact) == 1.0  # a monotone map keeps every rank
    assert spearman(-exact, exact) == -1.0
    with_nan = torch.tensor([[-3.0, float("nan")], [5.0, 2.0]])  # the NaN entry is left out
    assert spearman(with_nan, exact) == 0.5  # ranks (1, 3, 2) against (1, 2, 3)
    assert math.isnan(spearman(torch.zeros(2, 2), exact))  # constant


def test_top_k_recall():
    exact = torch.tensor([-3.0, -2.0, -1.0, 0.0])  # top-2: entries 0 and 1
    estimate = torch.tensor([-0.1, 5.0, -4.0, 0.0])  # by magnitude: 1, 2, 0, 3
    assert top_k_recall(estimate, exact, 2) == 0.5
    assert top_k_recall(estimate, exact, 2, n=3) == 1.0
    assert math.isnan(top_k_recall(torch.full((4,), float("nan")), exact, 2))
    assert math.isnan(top_k_recall(estimate, torch.zeros(4), 2))  # every sender ties: no top-k to find
