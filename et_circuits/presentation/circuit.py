"""Figures of the circuit stage: path-patching heatmaps per step, the circuit diagram (the
paper's Figure 1, for any circuit), tables as figures, completeness, and the position sweep."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from et_circuits.core.circuit import Circuit
from et_circuits.methods.discovery import Step
from et_circuits.methods.minimality import Completeness
from et_circuits.methods.sweep import Sweep

from .style import empty_panel, group_colours, group_title, head_label, letter, position_title

# ---------------------------------------------------------------------------------------------
# Path-patching heatmaps


def step_heatmaps(
    scores: dict[str, Float[Tensor, "layer head"]], circuit: Circuit | None = None, title: str = ""
) -> go.Figure:
    """One layer x head heatmap per step (red = negative = important), each with its own
    colour scale centred on 0; the heads that ended in the circuit's group are boxed. A step
    that scored no sender (its receivers were an empty group) says so in words."""
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
        if bool(s.isnan().all()):
            empty_panel(fig, i + 1, "no sender scored:<br>the group it would reach is empty")
            fig.update_xaxes(visible=False, row=row, col=col)
            fig.update_yaxes(visible=False, row=row, col=col)
            continue
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
                colorbar=dict(
                    x=x_dom[1] + 0.01,
                    y=(y_dom[0] + y_dom[1]) / 2,
                    len=y_dom[1] - y_dom[0],
                    thickness=10,
                    title=dict(text="score", side="right"),
                ),
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
                    hovertext=[head_label(l, h) for l, h in heads],
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


def circuit_diagram(
    circuit: Circuit, *, steps: Sequence[Step] | None = None, n_layers: int | None = None, title: str = ""
) -> go.Figure:
    """Any circuit's groups as columns at their token positions, each head at its layer, each
    group in its own colour. With the discovery `steps` that found it, the columns run left to
    right in the order information flows (the last step first) and an arrow goes from each
    non-empty group to the group it was found through, labelled with the inputs (the paper's
    D -V-> C -V-> B -Q-> A -> logits); without them, the groups in reverse order and no arrows."""
    found = [s for s in steps or () if s.group in circuit.groups]
    order = [s.group for s in found] + [g for g in circuit.groups if g not in {s.group for s in found}]
    columns = {group: i for i, group in enumerate(reversed(order))}
    arrows = []
    for i, s in enumerate(found):
        source = s.receivers_from or (found[i - 1].group if i else None)
        if s.receiver_kind is not None and circuit.groups[s.group] and circuit.groups.get(source):
            arrows.append((s.group, source, s.receiver_kind.upper()))
    fig = go.Figure()
    all_layers = [l for heads in circuit.groups.values() for l, _ in heads]
    top = n_layers if n_layers is not None else (max(all_layers) + 1 if all_layers else 1)
    centres: dict[str, tuple[float, float]] = {}
    colours = group_colours(order)
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
                hovertext=[head_label(l, h) for l, h in heads],
                hoverinfo="text",
                marker=dict(size=9, color=colours[group]),
                name=f"{group_title(group)} ({len(heads)})",
            )
        )
        fig.add_shape(
            type="rect",
            x0=column - 0.45,
            x1=column + 0.45,
            y0=(min(y) if y else 0) - 0.6,
            y1=(max(y) if y else 0) + 0.6,
            line=dict(color=colours[group], width=1.5, dash="dot"),
        )
    for sender, receiver, kind in arrows:
        (x0, y0), (x1, y1) = centres[sender], centres[receiver]
        _arrow(fig, (x0 + 0.45, y0), (x1 - 0.45, y1), size=1.3)
        fig.add_annotation(
            x=(x0 + x1) / 2,
            y=(y0 + y1) / 2,
            text=f"<b>{kind}</b>",
            showarrow=False,
            bgcolor="white",
            font=dict(size=14),
        )
    right = len(columns) - 0.1
    if found and circuit.groups[found[0].group]:  # the first step's group writes the logits
        ax, ay = centres[found[0].group]
        _arrow(fig, (ax + 0.45, ay), (right, top - 0.5))
        fig.add_annotation(x=right, y=top - 0.5, text="<b>logits</b>", showarrow=False, yshift=12)
    positions = [position_title(circuit.positions[g]) for g in columns]
    fig.update_xaxes(
        tickvals=list(columns.values()), ticktext=positions, range=[-0.6, right + 0.2], title="token position"
    )
    fig.update_yaxes(title="layer", range=[-1, top], dtick=1 if top <= 16 else 2)
    fig.update_layout(
        title=title or f"Circuit ({len(circuit)} heads)",
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


def completeness_figure(result: Completeness, title: str = "") -> go.Figure:
    """F(C \\ K) against F(M \\ K) per knocked-out set K of a `Completeness`; a complete circuit
    lies on the diagonal."""
    fig = go.Figure()
    for kind, symbol in (("group", "diamond"), ("random", "circle")):
        sel = [s for s in result.sets if s.kind == kind]
        fig.add_trace(
            go.Scatter(
                x=[s.model_without for s in sel],
                y=[s.circuit_without for s in sel],
                mode="markers+text" if kind == "group" else "markers",
                text=[letter(s.name) for s in sel] if kind == "group" else None,
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


def sweep_heatmap(result: Sweep, title: str = "") -> go.Figure:
    """The layer sweep of a `Sweep`: one row per position (labelled with the position and a
    typical prompt's token there), one column per layer; red = the patch lowers the metric.
    Marked positions are starred."""
    sweep = result.to_json()
    positions = [p if isinstance(p, str) else " / ".join(p) for p in sweep["positions"]]
    tokens = sweep.get("tokens") or [""] * len(positions)
    labels = [
        f"{'* ' if p in sweep['marked'] else ''}{p}" + (f" ({t})" if t else "") for p, t in zip(positions, tokens)
    ]
    scores = sweep["layers"]
    bound = max((abs(x) for row in scores for x in row), default=1.0) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=scores,
            x=list(range(len(scores[0]) if scores else 0)),
            y=labels,
            zmin=-bound,
            zmax=bound,
            colorscale="RdBu",
            colorbar=dict(title=dict(text="change of the metric", side="right")),
            hovertemplate="%{y}, layer %{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="layer", dtick=1 if scores and len(scores[0]) <= 16 else 4)
    fig.update_yaxes(title="position (a typical prompt's token)", autorange="reversed")
    fig.update_layout(
        title=title or "Position sweep: every head of a layer patched at a position (* marked)",
        width=900,
        height=max(400, 28 * len(labels) + 150),
        template="plotly_white",
    )
    return fig


def _arrow(fig, start: tuple[float, float], end: tuple[float, float], size: float = 1.0) -> None:
    """An arrow from `start` to `end` in data coordinates (a composition edge, or into the logits)."""
    fig.add_annotation(
        x=end[0],
        y=end[1],
        ax=start[0],
        ay=start[1],
        xref="x",
        yref="y",
        axref="x",
        ayref="y",
        showarrow=True,
        arrowhead=3,
        arrowsize=size,
        arrowwidth=2,
        arrowcolor="#555",
    )
