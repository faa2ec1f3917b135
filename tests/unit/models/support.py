"""What the models tests share: a one-line setup error, and writing a (registry) file."""

from __future__ import annotations

from pathlib import Path

import pytest

from et_circuits.core.errors import SetupError


def one_line_error(call, *parts: str) -> str:
    """The SetupError `call()` raises: one line holding every one of `parts`."""
    with pytest.raises(SetupError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
