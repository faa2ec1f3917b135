"""Plotly figures: `save_figure` (self-contained HTML + static PNG, used by every stage) and the
circuit stage's figures (path-patching heatmaps, the circuit diagram, Table 1, completeness)."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from .circuit import GROUP_LETTERS, GROUP_POSITIONS, Circuit
from .io import atomic_path
from .models import SetupError

_PNG_NEEDS = "PNG export needs kaleido with Chrome/Chromium (`make install` sets it up on Debian)."
FIGURES_ENV = "ET_CIRCUITS_FIGURES"  # overrides the default directory for every stage


def figures_dir() -> Path:
    """Where figures go by default: $ET_CIRCUITS_FIGURES, else `figures/`."""
    return Path(os.environ.get(FIGURES_ENV) or "figures")

GROUP_COLORS = {
    "value_fetcher": "#d62728",
    "pos_transmitter": "#1f77b4",
    "pos_detector": "#2ca02c",
    "struct_reader": "#9467bd",
}
GROUP_TITLES = {
    "value_fetcher": "A: Value Fetcher",
    "pos_transmitter": "B: Position Transmitter",
    "pos_detector": "C: Position Detector",
    "struct_reader": "D: Structure Reader",
}
POSITION_TITLES = {"prev_query_label": "previous query label", "query_label": "query label", "last": "last token"}


@contextmanager
def png_export():
    """Keep one headless browser open for all PNG exports inside (about 10x faster than a
    browser per figure). Optional: `save_figure` works without it."""
    import kaleido

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
        try:
            kaleido.start_sync_server(silence_warnings=True)
        except Exception as e:
            raise SetupError(f"cannot start kaleido for PNG export ({type(e).__name__}: {e}); {_PNG_NEEDS}") from None
        try:
            yield
        finally:
            kaleido.stop_sync_server(silence_warnings=True)


def save_figure(
    fig: go.Figure, stem: str, directory: str | os.PathLike | None = None, png: bool = True
) -> list[Path]:
    """Write `<directory>/<stem>.html` (plotly.js included, works offline), `<stem>.json` (the
    figure as plotly JSON, which the report page embeds) and, unless `png` is false,
    `<stem>.png`; each atomically. `directory` defaults to `figures_dir()`. Returns the paths
    written."""
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
    """`save_figure` for each (stem, figure), sharing one headless browser for the PNGs."""
    with png_export():
        for stem, fig in named:
            save_figure(fig, stem, directory)


def _head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# ---------------------------------------------------------------------------------------------
# Path-patching heatmaps


def step_heatmaps(
    scores: dict[str, Float[Tensor, "layer head"]], circuit: Circuit | None = None, title: str = ""
) -> go.Figure:
    """One layer x head heatmap per step (red = negative = important), each with its own
    colour scale centred on 0; the heads that ended in the circuit's group are boxed."""
    groups = [g for g in GROUP_POSITIONS if g in scores]
    titles = [GROUP_TITLES[g] for g in groups]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.16, vertical_spacing=0.14)
    for i, group in enumerate(groups):
        s = scores[group].float()
        n_layers, n_heads = s.shape
        row, col = i // 2 + 1, i % 2 + 1
        axis = "" if i == 0 else str(i + 1)
        x_dom = fig.layout[f"xaxis{axis}"].domain
        y_dom = fig.layout[f"yaxis{axis}"].domain
        bound = float(s.nan_to_num().abs().max()) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=s.tolist(),
                x=list(range(n_heads)),
                y=list(range(n_layers)),
                zmin=-bound,
                zmax=bound,
                colorscale="RdBu",
                reversescale=False,
                colorbar=dict(x=x_dom[1] + 0.01, y=(y_dom[0] + y_dom[1]) / 2, len=y_dom[1] - y_dom[0], thickness=10),
                hovertemplate="L%{y}H%{x}: %{z:.4f}<extra></extra>",
            ),
            row=row,
            col=col,
        )
        heads = circuit.groups.get(group, []) if circuit is not None else []
        if heads:
            fig.add_trace(
                go.Scatter(
                    x=[h for _, h in heads],
                    y=[l for l, _ in heads],
                    mode="markers",
                    marker=dict(symbol="square-open", size=14, color="black", line=dict(width=2)),
                    name="circuit head",
                    showlegend=i == 0,
                    hovertext=[_head_label(l, h) for l, h in heads],
                    hoverinfo="text",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text="head", dtick=1 if n_heads <= 16 else 4, row=row, col=col)
        fig.update_yaxes(title_text="layer", autorange="reversed", dtick=1 if n_layers <= 16 else 4, row=row, col=col)
    fig.update_layout(
        title=title or "Path patching scores (mean relative change of p(target))",
        width=1000,
        height=850,
        legend=dict(orientation="h", y=-0.08),
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Circuit diagram (the paper's Figure 1)

# Columns of the diagram: where each group acts, left to right in the order information flows.
_COLUMNS = {"struct_reader": 0, "pos_detector": 1, "pos_transmitter": 2, "value_fetcher": 3}
_ARROWS = [  # (sender group, receiver group, composition)
    ("struct_reader", "pos_detector", "V"),
    ("pos_detector", "pos_transmitter", "V"),
    ("pos_transmitter", "value_fetcher", "Q"),
]


def circuit_diagram(circuit: Circuit, n_layers: int | None = None, title: str = "") -> go.Figure:
    """Groups A-D as columns at their token positions, each head at its layer, with arrows for
    the compositions path patching traced (D -V-> C -V-> B -Q-> A -> logits)."""
    fig = go.Figure()
    all_layers = [l for heads in circuit.groups.values() for l, _ in heads]
    top = n_layers if n_layers is not None else (max(all_layers) + 1 if all_layers else 1)
    centres: dict[str, tuple[float, float]] = {}
    for group, column in _COLUMNS.items():
        heads = sorted(circuit.groups.get(group, []))
        x, y = [], []
        for layer in sorted({l for l, _ in heads}):  # spread a layer's heads across the column
            in_layer = [h for l, h in heads if l == layer]
            step = min(0.2, 0.8 / len(in_layer))
            x += [column + step * (j - (len(in_layer) - 1) / 2) for j in range(len(in_layer))]
            y += [layer] * len(in_layer)
        centres[group] = (column, sum(y) / len(y) if y else top / 2)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="markers+text",
                text=[f"H{h}" for _, h in heads],
                textposition="top center",
                textfont=dict(size=9),
                hovertext=[_head_label(l, h) for l, h in heads],
                hoverinfo="text",
                marker=dict(size=9, color=GROUP_COLORS[group]),
                name=f"{GROUP_TITLES[group]} ({len(heads)})",
            )
        )
        fig.add_shape(
            type="rect",
            x0=column - 0.45,
            x1=column + 0.45,
            y0=(min(y) if y else 0) - 0.6,
            y1=(max(y) if y else 0) + 0.6,
            line=dict(color=GROUP_COLORS[group], width=1.5, dash="dot"),
        )
    for sender, receiver, kind in _ARROWS:
        (x0, y0), (x1, y1) = centres[sender], centres[receiver]
        fig.add_annotation(
            x=x1 - 0.45, y=y1, ax=x0 + 0.45, ay=y0, xref="x", yref="y", axref="x", ayref="y",
            showarrow=True, arrowhead=3, arrowsize=1.3, arrowwidth=2, arrowcolor="#555",
        )
        fig.add_annotation(
            x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=f"<b>{kind}</b>", showarrow=False,
            bgcolor="white", font=dict(size=14),
        )
    ax, ay = centres["value_fetcher"]
    fig.add_annotation(
        x=3.9, y=top - 0.5, ax=ax + 0.45, ay=ay, xref="x", yref="y", axref="x", ayref="y",
        showarrow=True, arrowhead=3, arrowwidth=2, arrowcolor="#555",
    )
    fig.add_annotation(x=3.9, y=top - 0.5, text="<b>logits</b>", showarrow=False, yshift=12)
    positions = [POSITION_TITLES[circuit.positions.get(g, GROUP_POSITIONS[g])] for g in _COLUMNS]
    fig.update_xaxes(
        tickvals=list(_COLUMNS.values()), ticktext=positions, range=[-0.6, 4.1], title="token position"
    )
    fig.update_yaxes(title="layer", range=[-1, top], dtick=1 if top <= 16 else 2)
    fig.update_layout(
        title=title or f"Entity-tracking circuit ({len(circuit)} heads)",
        width=1100,
        height=max(650, 30 * top + 250),
        legend=dict(orientation="h", y=-0.15),
        plot_bgcolor="white",
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Tables and completeness


def table_figure(header: Sequence[str], rows: Sequence[Sequence], title: str = "") -> go.Figure:
    """A table (e.g. Table 1) as a figure."""
    columns = [[row[i] for row in rows] for i in range(len(header))]
    fig = go.Figure(
        go.Table(
            header=dict(values=[f"<b>{h}</b>" for h in header], fill_color="#dde4ee", align="center"),
            cells=dict(values=columns, align="center", height=26),
        )
    )
    fig.update_layout(
        title=title,
        width=max(500, 130 * len(header)),
        height=120 + 32 * (len(rows) + 1),
        margin=dict(t=60, b=20, l=20, r=20),
    )
    return fig


def completeness_figure(rows: Sequence[dict], title: str = "") -> go.Figure:
    """F(C \\ K) against F(M \\ K) per knocked-out set K; a complete circuit lies on the diagonal."""
    fig = go.Figure()
    for kind, symbol in (("group", "diamond"), ("random", "circle")):
        sel = [r for r in rows if r["kind"] == kind]
        fig.add_trace(
            go.Scatter(
                x=[r["model_without"] for r in sel],
                y=[r["circuit_without"] for r in sel],
                mode="markers+text" if kind == "group" else "markers",
                text=[GROUP_LETTERS.get(r["name"], r["name"]) for r in sel] if kind == "group" else None,
                textposition="top center",
                marker=dict(symbol=symbol, size=11),
                name=f"K = {kind}",
            )
        )
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"), name="x = y"))
    fig.update_xaxes(title="F(M \\ K): full model without K", range=[-0.02, 1.02])
    fig.update_yaxes(title="F(C \\ K): circuit without K", range=[-0.02, 1.02])
    fig.update_layout(title=title or "Completeness", width=650, height=600)
    return fig
