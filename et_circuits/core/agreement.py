"""How well an estimate ranks what an exact method scores: Spearman correlation over the senders
both score, and top-k recall (how many of the exact top-k the estimate ranks in its own top-N).
Benchmarks and the report measure attribution against exact path patching with these."""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor


def spearman(a: Float[Tensor, "layer head"], b: Float[Tensor, "layer head"]) -> float:
    """Spearman rank correlation over the entries both score (no NaN), ties at their average
    rank; NaN if fewer than two entries or either is constant."""
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    keep = ~(a.isnan() | b.isnan())
    if int(keep.sum()) < 2:
        return float("nan")
    ra, rb = (pd.Series(x[keep].numpy()).rank() for x in (a, b))
    return float(ra.corr(rb))


def top_k_recall(
    estimate: Float[Tensor, "layer head"], exact: Float[Tensor, "layer head"], k: int, n: int | None = None
) -> float:
    """The share of the exact method's k most negative entries (the heads a step would choose)
    that are among the estimate's `n` (default k) entries of largest magnitude, over the entries
    both score. NaN when nothing is scored or the exact scores are all equal (no top-k to find)."""
    estimate, exact = estimate.flatten().double().cpu(), exact.flatten().double().cpu()
    keep = ~(estimate.isnan() | exact.isnan())
    if not keep.any() or k <= 0:
        return float("nan")
    index = keep.nonzero()[:, 0]
    if bool((exact[index] == exact[index[0]]).all()):
        return float("nan")
    k = min(k, len(index))
    wanted = set(index[torch.sort(exact[index], stable=True).indices[:k]].tolist())
    screened = set(index[torch.sort(-estimate[index].abs(), stable=True).indices[: n or k]].tolist())
    return len(wanted & screened) / k
