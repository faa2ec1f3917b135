"""Loading refuses what it cannot do in one project error: a device this machine lacks, an
unknown dtype name, a truncated weight file; a dtype given by name works."""

from __future__ import annotations

import pytest
import torch

from et_circuits import models
from et_circuits.core.errors import SetupError
from tests import checkpoints


def test_a_missing_device_is_a_setup_error(tiny_dir):
    missing = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in missing:
        with pytest.raises(SetupError, match=f"device '{device}' is not available here; available: cpu"):
            models.load(tiny_dir, device=device)


def test_dtypes_by_name(tiny_dir):
    model, _, _ = models.load(tiny_dir, device="cpu", dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16 and model.W_Q.dtype == torch.bfloat16
    with pytest.raises(SetupError, match="dtype 'bfloat17' is not supported; use one of float32, bfloat16, float16"):
        models.load(tiny_dir, device="cpu", dtype="bfloat17")


def test_a_truncated_weight_file_is_named(tmp_path):
    checkpoints.make(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(SetupError, match="corrupt or truncated weight file"):
        models.load(tmp_path / "m", device="cpu")
