"""cmap.csv's and knockout.csv's rows."""

from __future__ import annotations

from et_circuits.methods.cmap import CmapResult
from et_circuits.methods.knockout import Knockout

# ---------------------------------------------------------------------------------------------
# CMAP and knockout rows


def cmap_rows(result: CmapResult, source_name: str, base_name: str, reading: str = "paper") -> list[dict]:
    """cmap.csv's rows: one per variant, with both baselines on every row; an empty set says so."""
    return [
        {
            "source": source_name,
            "base": base_name,
            "positions": reading,
            "set": v.name,
            "patch": v.patch,
            "n_heads": v.n_heads,
            "accuracy": None if value != value else round(value, 4),
            "base_accuracy": round(result.base, 4),
            "source_accuracy": round(result.source, 4),
            "n": result.n,
            "note": "no heads selected; not patched" if v.n_heads == 0 else "",
        }
        for v, value in result.variants
    ]


def knockout_rows(model_name: str, result: Knockout) -> list[dict]:
    """knockout.csv's rows: one per (edge, first blocked layer)."""
    return [
        {
            "model": model_name,
            "edge": edge,
            "from_layer": layer,
            "accuracy": round(value, 4),
            "full_accuracy": round(result.full, 4),
            "n": result.n,
        }
        for edge, values in result.curves.items()
        for layer, value in enumerate(values)
    ]
