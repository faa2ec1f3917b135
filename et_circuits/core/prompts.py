"""`PromptSet`: the task-neutral input of every method. Token ids, an attention mask, the answer
token of each prompt (optionally wrong answers), and named per-example positions.

A position is named, and its tensor holds one index per prompt (`Int[Tensor, "batch"]`) or,
for a *position set* such as "every segment's label", several (`Int[Tensor, "batch k"]`, -1
where a prompt has fewer). Methods take position *specs*: a name, or a name with an offset,
`"labels+1"` (the token after each label). Whoever builds the prompts computes the positions
once; no method derives them from token ids. A tuple of specs is their union, e.g.
`("labels+1", "labels+2")`: the two tokens after every label.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import DataError
from .types import Spec


def spec_text(spec: Spec | list[str]) -> str:
    """A position spec, or a union of them, as text for tables: "labels+1, labels+2"."""
    return spec if isinstance(spec, str) else ", ".join(spec)


LAST = "last"  # every prompt set has it: each prompt's last real token (the one metrics read)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:([+-])\s*(\d+))?\s*$")


def parse_spec(spec: str) -> tuple[str, int]:
    """`"labels+1"` -> ("labels", 1); `"last"` -> ("last", 0). DataError if malformed."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise DataError(f"position {spec!r} is not a name or name+offset (e.g. 'last', 'labels+1')")
    name, sign, number = m.groups()
    return name, (int(number) * (1 if sign == "+" else -1) if number else 0)


def _as_long(x, what: str) -> Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} must be integers ({e})") from None
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{what} must be integers, got {t.dtype}")
    return t.long()


@dataclass(frozen=True)
class PromptSet:
    """Prompts for a method: `input_ids` (right-padded), `answers` (one token id per prompt),
    `positions` (name -> one index per prompt, or a -1 padded set of them), an optional
    `attention_mask` (1 = real token; default: all real) and optional `wrong_answers` (token ids
    per prompt, for logit differences).

    `positions["last"]` defaults to each prompt's last real token."""

    input_ids: Int[Tensor, "batch seq"]
    answers: Int[Tensor, " batch"]
    positions: Mapping[str, Tensor] = field(default_factory=dict)
    attention_mask: Int[Tensor, "batch seq"] | None = None
    wrong_answers: Int[Tensor, "batch n_wrong"] | None = None

    def __post_init__(self) -> None:
        ids = _as_long(self.input_ids, "input_ids")
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise DataError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(ids.shape)}")
        n, seq = ids.shape
        answers = _as_long(self.answers, "answers").to(ids.device)
        if answers.shape != (n,):
            raise DataError(f"answers must hold one token id per prompt ({n}), got shape {tuple(answers.shape)}")
        mask = torch.ones_like(ids) if self.attention_mask is None else _as_long(self.attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise DataError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        mask = mask.to(ids.device)
        if not (mask[:, 0] == 1).all():
            raise DataError("every prompt needs a real first token (attention_mask[:, 0] == 1)")
        positions = {}
        for name, value in dict(self.positions).items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise DataError(f"position names are identifiers (no offsets), got {name!r}")
            t = _as_long(value, f"position {name!r}").to(ids.device)
            if t.ndim not in (1, 2) or t.shape[0] != n:
                raise DataError(
                    f"position {name!r} needs one index (or a row of indices) per prompt, got {tuple(t.shape)}"
                )
            real = t if t.ndim == 1 else t[t >= 0]
            if real.numel() and (real.min() < 0 or real.max() >= seq):
                raise DataError(f"position {name!r} lies outside the prompts (0..{seq - 1})")
            positions[name] = t
        if LAST not in positions:
            positions[LAST] = _last_real(mask)
        wrong = self.wrong_answers
        if wrong is not None:
            wrong = _as_long(wrong, "wrong_answers").to(ids.device)
            wrong = wrong[:, None] if wrong.ndim == 1 else wrong
            if wrong.ndim != 2 or wrong.shape[0] != n:
                raise DataError(f"wrong_answers needs a row of token ids per prompt, got {tuple(wrong.shape)}")
        for name, value in (
            ("input_ids", ids),
            ("answers", answers),
            ("attention_mask", mask),
            ("positions", positions),
            ("wrong_answers", wrong),
        ):
            object.__setattr__(self, name, value)

    # -- size and selection ------------------------------------------------------------------

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def __getitem__(self, index: slice | Sequence[int] | Tensor) -> PromptSet:
        """The prompts at `index` (a slice, or indices in any order), with their positions."""
        if not isinstance(index, slice):
            index = _as_long(index, "index").to(self.device)
        return PromptSet(
            self.input_ids[index],
            self.answers[index],
            {k: v[index] for k, v in self.positions.items()},
            self.attention_mask[index],
            None if self.wrong_answers is None else self.wrong_answers[index],
        )

    def chunks(self, size: int) -> Iterator[PromptSet]:
        """Consecutive prompt sets of at most `size` prompts."""
        if size <= 0:
            raise DataError(f"chunk size must be positive, got {size}")
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def to(self, device: torch.device | str) -> PromptSet:
        return PromptSet(
            self.input_ids.to(device),
            self.answers.to(device),
            {k: v.to(device) for k, v in self.positions.items()},
            self.attention_mask.to(device),
            None if self.wrong_answers is None else self.wrong_answers.to(device),
        )

    def replace(self, **changes) -> PromptSet:
        """A copy with some fields changed (e.g. other answers); positions given are merged in."""
        if "positions" in changes:
            changes["positions"] = {**self.positions, **changes["positions"]}
        return dataclasses.replace(self, **changes)

    # -- positions ---------------------------------------------------------------------------

    def position(self, spec: str) -> Int[Tensor, " batch"]:
        """One index per prompt for `spec` ("name" or "name+offset"); DataError for a position
        set or an unknown name."""
        at = self.position_set(spec)
        if at.shape[1] != 1 or self.positions[parse_spec(spec)[0]].ndim != 1:
            raise DataError(f"position {spec!r} is a set of positions per prompt, not one")
        return at[:, 0]

    def position_set(self, spec: Spec) -> Int[Tensor, "batch k"]:
        """The indices of `spec` as a (batch, k) tensor, -1 where a prompt has fewer; a
        single-valued position gives k = 1, a tuple of specs their union (concatenated).
        Offsets must stay inside each prompt."""
        if not isinstance(spec, str):
            if not spec:
                raise DataError("an empty tuple of positions")
            return torch.cat([self.position_set(s) for s in spec], dim=1)
        name, offset = parse_spec(spec)
        if name not in self.positions:
            raise DataError(f"unknown position {name!r}; these prompts have {', '.join(self.positions)}")
        at = self.positions[name]
        at = at[:, None] if at.ndim == 1 else at
        if offset:
            real = at >= 0
            moved = at + offset
            if (real & ((moved < 0) | (moved >= self.seq_len))).any():
                raise DataError(f"position {spec!r} falls outside some prompts")
            at = torch.where(real, moved, at)
        return at

    def check_vocab(self, d_vocab: int) -> PromptSet:
        """DataError unless every token id (input, answer, wrong answer) is a token of a
        vocabulary of `d_vocab`; returns the prompts."""
        for what, ids in (
            ("input_ids", self.input_ids),
            ("answers", self.answers),
            ("wrong_answers", self.wrong_answers),
        ):
            if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
                bad = int(ids.max()) if int(ids.max()) >= d_vocab else int(ids.min())
                raise DataError(f"token id {bad} in {what} is outside the model's vocabulary (0..{d_vocab - 1})")
        return self

    def check_pair(self, other: PromptSet, specs: Sequence[str] = (LAST,)) -> None:
        """DataError unless `other` (e.g. the corrupt prompts) pairs with these prompts one to
        one: same shape, and the same indices for every position in `specs`."""
        if self.input_ids.shape != other.input_ids.shape:
            raise DataError(
                f"prompt sets must come in pairs of equal shape, got {tuple(self.input_ids.shape)} "
                f"and {tuple(other.input_ids.shape)}"
            )
        for spec in dict.fromkeys([LAST, *specs]):
            if not torch.equal(self.position_set(spec), other.position_set(spec).to(self.device)):
                raise DataError(f"the paired prompt sets disagree on the {spec!r} position")


def _last_real(mask: Int[Tensor, "batch seq"]) -> Int[Tensor, " batch"]:
    """Index of each row's last real token."""
    seq = mask.shape[1]
    idx = torch.arange(seq, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).max(1).values
