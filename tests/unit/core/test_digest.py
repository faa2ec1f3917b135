"""weights_digest names the weights and dtype: the same checkpoint loaded twice gives one
digest; a tensor changed throughout, its last entry alone, or another dtype give others."""

from __future__ import annotations

import torch

from et_circuits import models
from et_circuits.core.digest import weights_digest


def test_digest_follows_the_weights_and_dtype(tiny_dir):
    model, _, _ = models.load(tiny_dir, device="cpu")
    again, _, _ = models.load(tiny_dir, device="cpu")
    assert weights_digest(model) == weights_digest(again)
    assert any(not p.is_contiguous() for p in model.parameters())  # sampled whatever the layout
    with torch.no_grad():
        again.blocks[1].attn.W_V.mul_(1.01)
    assert weights_digest(again) != weights_digest(model)
    third, _, _ = models.load(tiny_dir, device="cpu")
    with torch.no_grad():
        third.blocks[0].mlp.W_out[-1, -1] += 1.0  # the last entry of one tensor
    assert weights_digest(third) != weights_digest(model)
    half, _, _ = models.load(tiny_dir, device="cpu", dtype="bfloat16")
    assert weights_digest(half) != weights_digest(model)
