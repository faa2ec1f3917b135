"""Plotly figures, all of them: `save_figure` (self-contained HTML + static PNG, used by every
stage), the path-patching heatmaps, the circuit diagram (Figure 1), tables, completeness, DCM's
Figure 2, CMAP's Figure 3 and the knockout curves. Each takes results (tensors, circuits, pandas
frames) and returns a plotly figure, so a notebook can show it inline."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import math

import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from .circuit import Circuit
from .errors import SetupError
from .distributed import is_writer
from .io import atomic_path
from .cross_model import INPUT_PATCHES
from .entity_tracking import desiderata, recipe
from .path_patching import PAPER_STEPS, Step
from .position_sweep import Sweep
from .types import GROUPS, POSITION_TITLES, group_title, letter

_PNG_NEEDS = "PNG export needs kaleido with Chrome/Chromium (`make install` sets it up on Debian)."
FIGURES_ENV = "ET_CIRCUITS_FIGURES"  # overrides the default directory for every stage


def figures_dir() -> Path:
    """Where figures go by default: $ET_CIRCUITS_FIGURES, else `figures/`."""
    return Path(os.environ.get(FIGURES_ENV) or "figures")



@contextmanager
def png_export():
    """Keep one headless browser open for all PNG exports inside (about 10x faster than a
    browser per figure). Optional: `save_figure` works without it. Under torchrun only rank 0
    starts a browser: two kaleido servers at once can break each other."""
    if not is_writer():
        yield
        return
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
    groups = list(scores)
    titles = [group_title(g) for g in groups]
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
        title=title or "Path patching scores (relative change of the mean answer probability)",
        width=1000,
        height=850,
        legend=dict(orientation="h", y=-0.08),
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Circuit diagram (the paper's Figure 1)

OTHER_COLOUR = "#8c564b"  # groups outside the paper's table


def _colour(group: str) -> str:
    return GROUPS[group].colour if group in GROUPS else OTHER_COLOUR


def _position_title(spec) -> str:
    specs = (spec,) if isinstance(spec, str) else tuple(spec)
    return " / ".join(POSITION_TITLES.get(s, s) for s in specs)


def circuit_diagram(
    circuit: Circuit, n_layers: int | None = None, title: str = "", steps: Sequence[Step] = PAPER_STEPS
) -> go.Figure:
    """The circuit's groups as columns at their token positions, left to right in the order
    information flows (the last discovery step first), each head at its layer, with an arrow
    from each step's group to the group it was found through, labelled with the inputs
    (the paper's D -V-> C -V-> B -Q-> A -> logits)."""
    steps = [s for s in steps if s.group in circuit.groups]
    columns = {s.group: i for i, s in enumerate(reversed(steps))}
    arrows = [
        (s.group, s.receivers_from or steps[i - 1].group, s.receiver_kind.upper())
        for i, s in enumerate(steps) if s.receiver_kind is not None
    ]
    fig = go.Figure()
    all_layers = [l for heads in circuit.groups.values() for l, _ in heads]
    top = n_layers if n_layers is not None else (max(all_layers) + 1 if all_layers else 1)
    centres: dict[str, tuple[float, float]] = {}
    for group, column in columns.items():
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
                marker=dict(size=9, color=_colour(group)),
                name=f"{group_title(group)} ({len(heads)})",
            )
        )
        fig.add_shape(
            type="rect",
            x0=column - 0.45,
            x1=column + 0.45,
            y0=(min(y) if y else 0) - 0.6,
            y1=(max(y) if y else 0) + 0.6,
            line=dict(color=_colour(group), width=1.5, dash="dot"),
        )
    for sender, receiver, kind in arrows:
        (x0, y0), (x1, y1) = centres[sender], centres[receiver]
        fig.add_annotation(
            x=x1 - 0.45, y=y1, ax=x0 + 0.45, ay=y0, xref="x", yref="y", axref="x", ayref="y",
            showarrow=True, arrowhead=3, arrowsize=1.3, arrowwidth=2, arrowcolor="#555",
        )
        fig.add_annotation(
            x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=f"<b>{kind}</b>", showarrow=False,
            bgcolor="white", font=dict(size=14),
        )
    right = len(columns) - 0.1
    ax, ay = centres[steps[0].group]
    fig.add_annotation(
        x=right, y=top - 0.5, ax=ax + 0.45, ay=ay, xref="x", yref="y", axref="x", ayref="y",
        showarrow=True, arrowhead=3, arrowwidth=2, arrowcolor="#555",
    )
    fig.add_annotation(x=right, y=top - 0.5, text="<b>logits</b>", showarrow=False, yshift=12)
    positions = [_position_title(circuit.positions[g]) for g in columns]
    fig.update_xaxes(
        tickvals=list(columns.values()), ticktext=positions, range=[-0.6, right + 0.2], title="token position"
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
                text=[letter(r["name"]) for r in sel] if kind == "group" else None,
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


# ---------------------------------------------------------------------------------------------
# DCM: Figure 2 and group B on every desideratum (frames as `dcm-figure` writes dcm.csv)

DESIDERATUM_COLORS = {"positional": "#1f77b4", "object_value": "#d62728", "box_label_value": "#2ca02c"}


def figure2(frame, section: str = "base_circuit"):
    """Figure 2: per group of the base circuit (dcm.json's `section`: the paper's positions, or
    "base_discovered"), grouped bars (one per desideratum) over the models, accuracy (% of the
    desideratum's target) with the resampling std as error bars."""
    rows = frame[(frame.circuit == section) & frame.desideratum.isin(desiderata.MAIN)]
    where = "at the paper's positions" if section == "base_circuit" else "at its discovered positions"
    groups = list(dict.fromkeys(rows.group))
    models = list(dict.fromkeys(rows.model))
    fig = make_subplots(
        rows=1, cols=max(len(groups), 1), shared_yaxes=True,
        subplot_titles=[group_title(g) for g in groups],
    )
    for col, group in enumerate(groups, start=1):
        for desideratum in desiderata.MAIN:
            sel = rows[(rows.group == group) & (rows.desideratum == desideratum)].set_index("model").reindex(models)
            fig.add_trace(
                go.Bar(
                    x=models, y=sel.accuracy_mean, error_y=dict(type="data", array=sel.accuracy_std),
                    name=desideratum.replace("_", " "), legendgroup=desideratum, showlegend=col == 1,
                    marker_color=DESIDERATUM_COLORS[desideratum],
                    customdata=sel[["n_selected", "group_size"]].to_numpy(),
                    hovertemplate="%{x}: %{y:.1f}% (%{customdata[0]} of %{customdata[1]} heads)<extra></extra>",
                ),
                row=1, col=col,
            )
    base = rows.circuit_of.iloc[0] if len(rows) else ""
    fig.update_layout(
        title=f"DCM on the {base} circuit {where}: accuracy when the selected heads are patched (mean ± std over resamplings)",
        barmode="group", height=420, width=max(900, 330 * len(groups)), template="plotly_white",
    )
    fig.update_yaxes(range=[0, 100])
    fig.update_yaxes(title_text="accuracy (% of target)", row=1, col=1)
    return fig


def extra_figure(frame):
    """Group B of the base circuit on every desideratum (main and extra; controls last)."""
    rows = frame[(frame.circuit == "base_circuit") & (frame.group == recipe.EXTRA_GROUP)]
    order = [d for d in desiderata.ALL if d not in desiderata.CONTROLS] + list(desiderata.CONTROLS)
    names = [d for d in order if d in set(rows.desideratum)]
    fig = go.Figure()
    for model in dict.fromkeys(rows.model):
        sel = rows[rows.model == model].set_index("desideratum").reindex(names)
        fig.add_trace(go.Bar(
            x=[n.replace("_", " ") for n in names], y=sel.accuracy_mean,
            error_y=dict(type="data", array=sel.accuracy_std), name=model,
        ))
    fig.update_layout(
        title="Group B (position transmitter) on every desideratum (controls: is not in, wrong segment)",
        barmode="group", height=450, width=1100, template="plotly_white",
        yaxis=dict(range=[0, 100], title="accuracy (% of target)"),
    )
    return fig


# ---------------------------------------------------------------------------------------------
# CMAP: Figure 3 and input patching (frames as `cmap` writes cmap.csv)

PATCH_TITLES = {"z": "outputs (z)", "q": "queries", "k": "keys", "v": "values", "qk": "queries + keys",
                "qkv": "queries + keys + values"}


def _pairs(frame) -> list[tuple[str, str, float, float]]:
    """(source, base, base accuracy, source accuracy) of each pair in `frame`, in order."""
    first = frame.drop_duplicates(["source", "base"])
    return list(zip(first["source"], first["base"], first["base_accuracy"], first["source_accuracy"]))


def _baselines(fig, x: list, base_acc: float, source_acc: float, col: int) -> None:
    """Dashed horizontal lines across the bars: base (red) and fine-tuned (green) accuracy."""
    for name, value, color in (("base model", base_acc, "#e45756"), ("fine-tuned model", source_acc, "#54a24b")):
        fig.add_trace(
            go.Scatter(
                x=x, y=[value] * len(x), mode="lines", name=f"{name} alone", legendgroup=name,
                line=dict(dash="dash", color=color), showlegend=col == 1,
                hovertemplate=f"{name}: {value:.2f}<extra></extra>",
            ),
            row=1, col=col,
        )


def _panels(pairs, title: str):
    fig = make_subplots(
        rows=1, cols=max(len(pairs), 1), shared_yaxes=True,
        subplot_titles=[f"{s} -> {b}<br><sup>base {ba:.2f}, fine-tuned {sa:.2f}</sup>" for s, b, ba, sa in pairs],
    )
    fig.update_yaxes(range=[0, 1.08], title_text="base-model accuracy", row=1, col=1)
    fig.update_layout(
        title=title, template="plotly_white", height=460, width=120 + 400 * max(len(pairs), 1),
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


def cmap_figure(frame, patch: str = "z"):
    """Figure 3: per source -> base pair, one bar per head set (sizes in brackets) patched
    with `patch`, and the two models' own accuracies as dashed lines; an empty set shows
    'none' and no bar."""
    frame = frame[frame["patch"] == patch]
    pairs = _pairs(frame)
    fig = _panels(pairs, f"CMAP: the fine-tuned model's head {PATCH_TITLES[patch]} patched into the base model")
    for col, (source, base, base_acc, source_acc) in enumerate(pairs, start=1):
        rows = frame[(frame["source"] == source) & (frame["base"] == base)].set_index("set")
        rows = rows.reindex([s for s in rows.index if s not in recipe.SET_ORDER] + [s for s in recipe.SET_ORDER if s in rows.index])
        x = [f"{s} ({int(n)})" for s, n in zip(rows.index, rows["n_heads"])]
        fig.add_trace(
            go.Bar(
                x=x, y=rows["accuracy"], marker_color="#4c78a8", name="patched base model",
                showlegend=col == 1, legendgroup="patched",
                text=["none" if math.isnan(a) else f"{a:.2f}" for a in rows["accuracy"].astype(float)],
                textposition="outside",
            ),
            row=1, col=col,
        )
        _baselines(fig, x, base_acc, source_acc, col)
    return fig


def input_patching_figure(frame):
    """Input patching: per pair, bars per patch kind (q, k, v, qk, qkv, and output z beside
    them), one colour per head set that was input-patched."""
    input_sets = list(dict.fromkeys(frame.loc[frame["patch"].isin(INPUT_PATCHES), "set"]))
    frame = frame[frame["set"].isin(input_sets)]
    pairs = _pairs(frame)
    fig = _panels(pairs, "CMAP input patching: q / k / v of the fine-tuned model's heads in the base model")
    order = [*INPUT_PATCHES, "z"]
    colors = dict(zip(recipe.SET_ORDER[::-1], ("#4c78a8", "#f58518", "#72b7b2", "#b279a2", "#9d755d")))
    for col, (source, base, base_acc, source_acc) in enumerate(pairs, start=1):
        rows = frame[(frame["source"] == source) & (frame["base"] == base)]
        for name in input_sets:
            r = rows[rows["set"] == name].set_index("patch").reindex(order)
            fig.add_trace(
                go.Bar(
                    x=order, y=r["accuracy"], name=f"set {name} ({int(r['n_heads'].fillna(0).max())} heads)",
                    marker_color=colors.get(name, OTHER_COLOUR), legendgroup=name, showlegend=col == 1,
                    text=["none" if math.isnan(a) else f"{a:.2f}" for a in r["accuracy"].astype(float)],
                    textposition="outside",
                ),
                row=1, col=col,
            )
        _baselines(fig, order, base_acc, source_acc, col)
    fig.update_layout(barmode="group")
    return fig


# ---------------------------------------------------------------------------------------------
# Attention knockout (frames as `knockout` writes knockout.csv)


def knockout_figure(frame):
    """Accuracy vs the first blocked layer, one line per edge; dashed: the unblocked model."""
    fig = go.Figure()
    for edge, rows in frame.groupby("edge", sort=False):
        fig.add_trace(
            go.Scatter(x=rows["from_layer"], y=rows["accuracy"], mode="lines+markers", name=recipe.EDGE_TITLES.get(edge, edge))
        )
    full = float(frame["full_accuracy"].iloc[0])
    fig.add_hline(y=full, line_dash="dash", line_color="grey", annotation_text=f"no knockout {full:.2f}")
    model = ", ".join(dict.fromkeys(frame["model"]))
    fig.update_layout(
        title=f"Attention knockout in {model}<br><sup>one edge blocked in every head of layers L and above</sup>",
        xaxis_title="first blocked layer L", yaxis_title="accuracy", yaxis_range=[0, 1.05],
        xaxis=dict(dtick=1 if frame["from_layer"].max() < 16 else None),
        template="plotly_white", height=480, width=700, legend=dict(orientation="h", y=-0.2),
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Position sweep (as the circuit stage writes sweep.json)


def sweep_heatmap(sweep: Sweep | dict, title: str = "") -> go.Figure:
    """The layer sweep (a `Sweep`, or its JSON as in sweep.json): one row per position (labelled
    with the position and a typical prompt's token there), one column per layer; red = the
    patch lowers the metric. Marked positions are starred."""
    if isinstance(sweep, Sweep):
        sweep = sweep.to_json()
    positions = [p if isinstance(p, str) else " / ".join(p) for p in sweep["positions"]]
    tokens = sweep.get("tokens") or [""] * len(positions)
    labels = [f"{'* ' if p in sweep['marked'] else ''}{p}" + (f" ({t})" if t else "") for p, t in zip(positions, tokens)]
    scores = sweep["layers"]
    bound = max((abs(x) for row in scores for x in row), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(
        z=scores, x=list(range(len(scores[0]) if scores else 0)), y=labels, zmin=-bound, zmax=bound,
        colorscale="RdBu", hovertemplate="%{y}, layer %{x}: %{z:.4f}<extra></extra>",
    ))
    fig.update_xaxes(title="layer", dtick=1 if scores and len(scores[0]) <= 16 else 4)
    fig.update_yaxes(title="position (a typical prompt's token)", autorange="reversed")
    fig.update_layout(
        title=title or "Position sweep: every head of a layer patched at a position (* marked)",
        width=900, height=max(400, 28 * len(labels) + 150), template="plotly_white",
    )
    return fig
