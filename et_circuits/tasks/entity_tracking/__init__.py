"""The entity-tracking task of Prakash et al. (2024): prompts (`data`), DCM desiderata
(`desiderata`), what the paper says (`paper`: its groups, steps and published numbers), its
protocol over the toolkit's methods (`recipe`) and the model organism trained on it
(`organism`). Each loads on first use, so that the command line can read `paper` without
loading torch."""

import importlib

__all__ = ["data", "desiderata", "paper", "recipe", "organism"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")
