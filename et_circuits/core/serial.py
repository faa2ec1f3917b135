"""What every method's result type shares: the JSON forms of what results hold (position specs,
heads, receivers, score tables), the short text of numbers and heads their reprs use, and
frames (pandas, imported where a frame is made)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .prompts import Spec
from .types import Head, Receiver


def spec_to_json(spec: Spec) -> str | list[str]:
    return spec if isinstance(spec, str) else list(spec)


def spec_from_json(value) -> Spec:
    return value if isinstance(value, str) else tuple(value)


def heads_to_json(heads: Iterable[Head]) -> list[list[int]]:
    return [[int(layer), int(head)] for layer, head in heads]


def heads_from_json(value) -> list[Head]:
    return [(int(layer), int(head)) for layer, head in value]


def receivers_to_json(receivers: Iterable[Receiver]) -> list[list]:
    return [[int(r.layer), int(r.head), r.kind, spec_to_json(r.position)] for r in receivers]


def receivers_from_json(value) -> tuple[Receiver, ...]:
    return tuple(Receiver(int(l), int(h), kind, spec_from_json(p)) for l, h, kind, p in value)


def table_to_json(t: Float[Tensor, "rows cols"]) -> list[list[float | None]]:
    """A 2-D tensor as nested lists, NaN as null."""
    return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]


def table_from_json(value) -> Float[Tensor, "rows cols"]:
    return torch.tensor([[math.nan if x is None else x for x in row] for row in value], dtype=torch.float32)


def number(x: float | None, decimals: int = 3) -> str:
    """A number as reprs and tables show it: rounded to `decimals`, "nan" / "–" for none."""
    if x is None:
        return "–"
    return "nan" if math.isnan(x) else f"{x:.{decimals}f}"


def head_text(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


def heads_text(heads: Sequence[Head], most: int = 8) -> str:
    """ "L1H2 L1H3 ..." (at most `most` heads, then how many more)."""
    shown = " ".join(head_text(h) for h in heads[:most])
    return shown + (f" +{len(heads) - most}" if len(heads) > most else "") if heads else "(none)"


def frame(rows: list[dict], columns: Sequence[str]):
    """A pandas DataFrame of `rows` with exactly `columns`."""
    import pandas as pd

    return pd.DataFrame(rows, columns=list(columns))
