"""A full digest of what a method is given, for tests whose fake methods answer as a function
of their inputs (every weight of a model, every tensor of a prompt set)."""

from __future__ import annotations

import dataclasses
import hashlib

import torch


def digest(value) -> str:
    """sha256 of `value`: a model by every weight, a dataclass by its fields, a tensor by its
    bytes, a dict by its items, anything else by its repr."""
    h = hashlib.sha256()
    if isinstance(value, torch.nn.Module):
        for name, p in value.state_dict().items():
            h.update(name.encode() + str(p.dtype).encode() + p.float().cpu().numpy().tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            h.update(digest(getattr(value, f.name)).encode())
    elif isinstance(value, torch.Tensor):
        h.update(value.cpu().numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value):
            h.update(str(k).encode() + digest(value[k]).encode())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()
