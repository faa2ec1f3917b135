"""Figures of the CMAP stage (frames as `cmap` writes cmap.csv): the paper's Figure 3 and input
patching."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from et_circuits.methods.cmap import INPUT_PATCHES
from et_circuits.tasks.entity_tracking import recipe

from .style import OTHER_COLOUR

PATCH_TITLES = {
    "z": "outputs (z)",
    "q": "queries",
    "k": "keys",
    "v": "values",
    "qk": "queries + keys",
    "qkv": "queries + keys + values",
}


def _pairs(frame) -> list[tuple[str, str, float, float]]:
    """(source, base, base accuracy, source accuracy) of each pair in `frame`, in order."""
    first = frame.drop_duplicates(["source", "base"])
    return list(zip(first["source"], first["base"], first["base_accuracy"], first["source_accuracy"]))


def _baselines(fig, x: list, base_acc: float, source_acc: float, col: int) -> None:
    """Dashed horizontal lines across the bars: base (red) and fine-tuned (green) accuracy."""
    for name, value, color in (("base model", base_acc, "#e45756"), ("fine-tuned model", source_acc, "#54a24b")):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[value] * len(x),
                mode="lines",
                name=f"{name} alone",
                legendgroup=name,
                line=dict(dash="dash", color=color),
                showlegend=col == 1,
                hovertemplate=f"{name}: {value:.2f}<extra></extra>",
            ),
            row=1,
            col=col,
        )


def _panels(pairs, title: str):
    fig = make_subplots(
        rows=1,
        cols=max(len(pairs), 1),
        shared_yaxes=True,
        subplot_titles=[f"{s} -> {b}<br><sup>base {ba:.2f}, fine-tuned {sa:.2f}</sup>" for s, b, ba, sa in pairs],
    )
    fig.update_yaxes(range=[0, 1.08], title_text="base-model accuracy", row=1, col=1)
    fig.update_layout(
        title=title,
        template="plotly_white",
        height=460,
        width=120 + 400 * max(len(pairs), 1),
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
        rows = rows.reindex(
            [s for s in rows.index if s not in recipe.SET_ORDER] + [s for s in recipe.SET_ORDER if s in rows.index]
        )
        x = [f"{s} ({int(n)})" for s, n in zip(rows.index, rows["n_heads"])]
        fig.add_trace(
            go.Bar(
                x=x,
                y=rows["accuracy"],
                marker_color="#4c78a8",
                name="patched base model",
                showlegend=col == 1,
                legendgroup="patched",
                text=["none" if math.isnan(a) else f"{a:.2f}" for a in rows["accuracy"].astype(float)],
                textposition="outside",
            ),
            row=1,
            col=col,
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
                    x=order,
                    y=r["accuracy"],
                    name=f"set {name} ({int(r['n_heads'].fillna(0).max())} heads)",
                    marker_color=colors.get(name, OTHER_COLOUR),
                    legendgroup=name,
                    showlegend=col == 1,
                    text=["none" if math.isnan(a) else f"{a:.2f}" for a in r["accuracy"].astype(float)],
                    textposition="outside",
                ),
                row=1,
                col=col,
            )
        _baselines(fig, order, base_acc, source_acc, col)
    fig.update_layout(barmode="group")
    return fig
