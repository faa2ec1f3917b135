"""Desiderata-based Component Masking (DCM): `pairs` (the data), `masking` (the masked forward
pass), `training` (one mask, or many in one batch) and `protocol` (seeds, selection and
resampled accuracy: `dcm`, `dcm_many`)."""

from .masking import mask_hooks, masked_logits, patched_logits
from .pairs import PairData, Pairs, Question, prepare_pairs, source_values
from .protocol import DCMResult, SeedResult, bootstrap, dcm, dcm_many, select_seed, summarize
from .training import THRESHOLD, DCMConfig, MaskJob, MaskResult, train_mask, train_masks

__all__ = [
    "Pairs",
    "PairData",
    "prepare_pairs",
    "source_values",
    "mask_hooks",
    "masked_logits",
    "patched_logits",
    "DCMConfig",
    "MaskJob",
    "MaskResult",
    "THRESHOLD",
    "train_mask",
    "train_masks",
    "Question",
    "SeedResult",
    "DCMResult",
    "bootstrap",
    "dcm",
    "dcm_many",
    "select_seed",
    "summarize",
]
