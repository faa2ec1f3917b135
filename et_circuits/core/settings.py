"""`RunSettings`: how a method runs (chunk sizes, progress bars), in one small object that the
CLI, the stages, the recipes and the methods pass down unchanged. None of it changes a result.
Also which devices this machine has. Importing this module loads no torch (the command line's
parser reads its defaults); the device functions import it when called."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import SetupError

if TYPE_CHECKING:
    import torch

FAST_ROWS = 4096  # default rows per forward pass of the batched (fast) methods


@dataclass(frozen=True)
class RunSettings:
    """`batch_size`: prompts per plain forward pass. `max_rows`: rows per pass of the methods
    that stack many interventions into one batch (fast path patching: (sender, prompt) rows);
    their memory knob. `progress`: show tqdm bars on long runs (off by default, as in every
    method's default settings; the command line turns them on unless --quiet)."""

    batch_size: int = 32
    max_rows: int = FAST_ROWS
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.max_rows <= 0:
            raise SetupError(f"batch size and rows must be positive, got {self.batch_size} and {self.max_rows}")


QUIET = RunSettings()  # every method's default


def available_devices() -> list[str]:
    """The devices this machine can run on, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device | None, n_devices: int = 1) -> str:
    """`device` checked against this machine (default: the first GPU if any, else the CPU).
    SetupError naming the available devices when torch cannot use it. Under torchrun, "cuda"
    is this rank's (first) GPU, for models split over `n_devices` GPUs each."""
    import torch

    from .distributed import local_device

    if device is None:
        return local_device(n_devices) if torch.cuda.is_available() else "cpu"
    if str(device) == "cuda" and torch.cuda.is_available():
        return local_device(n_devices)
    name = str(device)
    try:
        parsed = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    ok = parsed is not None and (
        parsed.type == "cpu"
        or (
            parsed.type == "cuda"
            and torch.cuda.is_available()
            and (parsed.index is None or parsed.index < torch.cuda.device_count())
        )
        or (parsed.type == "mps" and "mps" in available_devices())
    )
    if not ok:
        raise SetupError(f"device {name!r} is not available here; available: {', '.join(available_devices())}")
    return name
