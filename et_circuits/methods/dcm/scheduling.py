"""How DCM's work is scheduled: which (question, seed) trainings share a batch (`stacks_of`) and
which base prompts' clean runs are made once and shared (`shared_runs`)."""

from __future__ import annotations

from collections.abc import Sequence

from transformer_lens import HookedTransformer

from et_circuits.core.prompts import PromptSet, Spec
from et_circuits.core.restart import CleanRun, restart_bytes, restarts

from .pairs import Question, restart_point


def stacks_of(questions: Sequence[Question], todo: Sequence[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """The (question, seed) jobs in stacks of at most `size` that train together: jobs whose
    questions share heads, positions and base prompts (the seeds of a question, and the
    questions of one group asked on the same prompts), in order of first appearance."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, seed in todo:
        q = questions[i]
        key = (q.heads, q.position, id(q.fit.base.input_ids), id(q.test.base.input_ids))
        groups.setdefault(key, []).append((i, seed))
    return [jobs[s : s + size] for jobs in groups.values() for s in range(0, len(jobs), size)]


def shared_runs(
    model: HookedTransformer, questions: Sequence[Question], batch_size: int, max_restart_bytes: int
) -> dict[tuple[int, tuple, Spec], CleanRun]:
    """Restricted clean runs of every question's fit and test base prompts, keyed by (id of the
    base token tensor, heads, position): one pass per distinct base tensor for all restart points
    (points that would not fit in `max_restart_bytes` together get none: full forwards)."""
    by_base: dict[int, tuple[PromptSet, dict[tuple[int, int], list]]] = {}
    for q in questions:
        if not q.heads:
            continue
        for pairs in (q.fit, q.test):
            base = pairs.base
            points = by_base.setdefault(id(base.input_ids), (base, {}))[1]
            points.setdefault(restart_point(q.heads, base.position_set(q.position)), []).append((q.heads, q.position))
    out: dict[tuple[int, tuple, Spec], CleanRun] = {}
    for key, (base, points) in by_base.items():
        n, seq = base.input_ids.shape
        budget, chosen = max_restart_bytes, []
        for point in points:
            size = restart_bytes(model, n, seq, *point)
            if size <= budget:
                chosen.append(point)
                budget -= size
        for point, run in zip(chosen, restarts(model, base.input_ids, chosen, batch_size)):
            for heads, position in points[point]:
                out[(key, heads, position)] = run
    return out
