"""Writing figures: `save_figure` (self-contained HTML, plotly JSON and a static PNG, each
atomically), `save_figures` (one headless browser per process for every PNG) and the default
folder."""

from __future__ import annotations

import atexit
import os
import warnings
from pathlib import Path

import plotly.graph_objects as go

from et_circuits.core.distributed import is_writer
from et_circuits.core.errors import SetupError
from et_circuits.core.io import atomic_path

_PNG_NEEDS = "PNG export needs kaleido with Chrome/Chromium (`make install` sets it up on Debian)."
FIGURES_ENV = "ET_CIRCUITS_FIGURES"  # overrides the default directory for every stage


def figures_dir() -> Path:
    """Where figures go by default: $ET_CIRCUITS_FIGURES, else `figures/`."""
    return Path(os.environ.get(FIGURES_ENV) or "figures")


_browser_started = False  # whether this process started its headless browser


def start_browser() -> None:
    """Start this process's headless browser for PNG export once (about 10x faster than a
    browser per figure; closed when the process exits), so that every figure a process draws,
    in one stage or several, pays for one start (seconds). Optional: `save_figure` works
    without it. Nothing in a process that writes no files (a torchrun rank but the first)."""
    global _browser_started
    if _browser_started or not is_writer():
        return
    import kaleido

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        try:
            kaleido.start_sync_server(silence_warnings=True)
        except Exception as e:
            raise SetupError(f"cannot start kaleido for PNG export ({type(e).__name__}: {e}); {_PNG_NEEDS}") from None
    atexit.register(kaleido.stop_sync_server, silence_warnings=True)
    _browser_started = True


def save_figure(fig: go.Figure, stem: str, directory: str | os.PathLike | None = None, png: bool = True) -> list[Path]:
    """Write `<directory>/<stem>.html` (plotly.js included, works offline), `<stem>.json` (the
    figure as plotly JSON, which the report page embeds) and, unless `png` is false,
    `<stem>.png`; each atomically. `directory` defaults to `figures_dir()`. Returns the paths
    written (none on a torchrun rank other than 0, which writes nothing)."""
    if not is_writer():
        return []
    directory = Path(directory) if directory is not None else figures_dir()
    html, spec = directory / f"{stem}.html", directory / f"{stem}.json"
    with atomic_path(html) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True)
    with atomic_path(spec) as tmp:
        tmp.write_text(fig.to_json())
    written = [html, spec]
    if png:
        path = directory / f"{stem}.png"
        try:
            with warnings.catch_warnings(), atomic_path(path) as tmp:
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                fig.write_image(tmp, format="png", scale=2)
        except Exception as e:  # kaleido raises several types when no browser is found
            raise SetupError(
                f"PNG export of {stem} failed ({type(e).__name__}: {e}); {_PNG_NEEDS} The HTML was written."
            ) from None
        written.append(path)
    return written


def save_figures(named: list[tuple[str, go.Figure]], directory: str | os.PathLike | None = None) -> None:
    """`save_figure` for each (stem, figure), with the process's one headless browser for the PNGs."""
    start_browser()
    for stem, fig in named:
        save_figure(fig, stem, directory)
