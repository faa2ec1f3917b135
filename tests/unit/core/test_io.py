"""Atomic result files: nothing half-written on failure, ordinary permissions on success."""

from __future__ import annotations

import os

import pytest

from et_circuits.core import io


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "result.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert io.read_json(tmp_path / "r.json") == {"a": 1}
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
