"""Metrics: pure functions of the logits at each prompt's last position.

A metric is a callable `metric(logits, prompts) -> scalar`, as in TransformerLens'
`patching.py`: `logits` are the logits at each prompt's last position ([batch, vocab]) and
`prompts` the PromptSet they belong to. Methods evaluate metrics chunk by chunk, so a metric
must be a mean over its prompts (both ready ones are): the value on a whole set is the mean of
the chunk values weighted by chunk size. `metric_total` and `score_of` turn metric values into
the scores the methods report.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import DataError
from .prompts import PromptSet

Metric = Callable[[Float[Tensor, "batch vocab"], PromptSet], Tensor | float]


def _answer_probs(logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, " batch"]:
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.gather(-1, prompts.answers.to(probs.device)[:, None])[:, 0]


def answer_prob(logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, ""]:
    """Mean probability of each prompt's answer token (softmax in float32)."""
    return _answer_probs(logits, prompts).mean()


def _logit_diffs(logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, " batch"]:
    if prompts.wrong_answers is None:
        raise DataError("logit_diff needs prompts with wrong_answers")
    logits = logits.float()
    right = logits.gather(-1, prompts.answers.to(logits.device)[:, None])[:, 0]
    wrong = logits.gather(-1, prompts.wrong_answers.to(logits.device)).mean(-1)
    return right - wrong


def logit_diff(logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, ""]:
    """Mean of (answer logit - mean logit of the prompt's wrong answers); needs `wrong_answers`."""
    return _logit_diffs(logits, prompts).mean()


def _correct(logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, " batch"]:
    return (logits.argmax(-1) == prompts.answers.to(logits.device)).float()


def accuracy(logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, ""]:
    """Fraction of prompts whose argmax is the answer token."""
    return _correct(logits, prompts).mean()


# Each ready metric's value per prompt (its mean is the metric), for methods that resample prompts.
answer_prob.per_prompt = _answer_probs
logit_diff.per_prompt = _logit_diffs
accuracy.per_prompt = _correct


def per_prompt(metric: Metric, logits: Float[Tensor, "batch vocab"], prompts: PromptSet) -> Float[Tensor, " batch"]:
    """Each prompt's value of `metric` (float32, CPU): its `per_prompt` form where it has one
    (the ready metrics do), else the metric on each prompt alone."""
    own = getattr(metric, "per_prompt", None)
    if own is not None:
        return own(logits, prompts).float().cpu()
    return torch.tensor([metric_value(metric(logits[i : i + 1], prompts[i : i + 1])) for i in range(len(prompts))])


def metric_name(metric: Metric) -> str:
    """The name results record for a metric (its function name)."""
    return getattr(metric, "__name__", type(metric).__name__)


def n_correct(logits: Float[Tensor, "batch vocab"], answers: Int[Tensor, " batch"]) -> int:
    """How many rows' argmax is the answer."""
    return int((logits.argmax(-1) == answers.to(logits.device)).sum())


def metric_value(value: Tensor | float) -> float:
    """A metric's value as a Python float."""
    return value.item() if isinstance(value, Tensor) else float(value)


def metric_total(metric: Metric, logits: Tensor, prompts: PromptSet) -> float:
    """The metric on one chunk, times its size (chunks add up to n x the set's metric)."""
    value = metric(logits, prompts)
    value = value.double().mean() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    return float(value) * len(prompts)


def score_of(total: Tensor, total_clean: float, n: int, relative: bool) -> Tensor:
    """Scores from `metric_total`s over n prompts: metric(patched) - metric(clean), divided by
    metric(clean) when `relative` (float32)."""
    clean_value = total_clean / n
    scores = total / n - clean_value
    if relative:
        if clean_value == 0:
            raise DataError("the metric is 0 on the clean prompts: a relative score is undefined")
        scores = scores / clean_value
    return scores.float()
