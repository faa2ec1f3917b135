"""The entity-tracking task of Prakash et al. (2024): prompts (`data`), DCM desiderata
(`desiderata`), what the paper says (`paper`: its groups, steps and published numbers), its
protocol over the toolkit's methods (`recipe`) and the model organism trained on it
(`organism`)."""

from . import data, desiderata, paper, recipe

__all__ = ["data", "desiderata", "paper", "recipe"]
