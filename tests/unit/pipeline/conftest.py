"""Fixtures of the pipeline tests."""

from __future__ import annotations

import pytest

from tests.conftest import make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tiny_dir, tmp_path_factory):
    """The tiny checkpoint, and one of the same folder name with other weights."""
    other = tmp_path_factory.mktemp("other-weights") / tiny_dir.name
    make_checkpoint(other, seed=1)
    return tiny_dir, other
