"""The screened discovery's figure: per step, every sender's attribution against its exact
path-patching score, for the senders scored both ways, with their rank correlation; the heads
of the step's group highlighted (chosen from the exact scores)."""

from __future__ import annotations

import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from et_circuits.core.agreement import spearman
from et_circuits.core.circuit import Circuit

from .style import colour, group_title, head_label


def attribution_scatter(
    pairs: dict[str, tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]],
    circuit: Circuit,
    title: str = "",
) -> go.Figure:
    """One panel per step: x the exact score, y the attribution, one point per sender scored
    both ways (exact NaN: screened out, not drawn); the heads of the step's group in `circuit`
    (the top-k candidates, before minimality) filled, the others open.
    Each panel's title gives the Spearman correlation over its points."""
    groups = list(pairs)
    titles = []
    for g in groups:
        estimate, exact = pairs[g]
        both = ~(estimate.isnan() | exact.isnan())
        rho = spearman(estimate, exact)
        titles.append(
            f"{group_title(g)}: ρ = {rho:+.2f} ({int(both.sum())} senders)" if both.sum() > 1 else group_title(g)
        )
    fig = make_subplots(rows=(len(groups) + 1) // 2, cols=2, subplot_titles=titles or [""])
    for i, g in enumerate(groups):
        estimate, exact = pairs[g]
        row, col = i // 2 + 1, i % 2 + 1
        chosen = set(circuit.groups.get(g, []))
        heads = [tuple(h) for h in (~(estimate.isnan() | exact.isnan())).nonzero().tolist()]
        if not heads:
            axis = "" if i == 0 else str(i + 1)
            x, y = (sum(fig.layout[f"{a}axis{axis}"].domain) / 2 for a in "xy")
            fig.add_annotation(
                text="no sender scored both ways",
                xref="paper",
                yref="paper",
                x=x,
                y=y,
                xanchor="center",
                showarrow=False,
            )
            fig.update_xaxes(visible=False, row=row, col=col)
            fig.update_yaxes(visible=False, row=row, col=col)
            continue
        for picked in (False, True):
            these = [h for h in heads if (h in chosen) == picked]
            fig.add_trace(
                go.Scatter(
                    x=[float(exact[h]) for h in these],
                    y=[float(estimate[h]) for h in these],
                    text=[head_label(*h) for h in these],
                    mode="markers",
                    marker=dict(color=colour(g), size=9, symbol="circle" if picked else "circle-open"),
                    name=f"{group_title(g)}: {'in the group' if picked else 'not chosen'}",
                    showlegend=False,
                    hovertemplate="%{text}: exact %{x:.3g}, attribution %{y:.3g}<extra></extra>",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text="exact score", row=row, col=col)
        fig.update_yaxes(title_text="attribution", row=row, col=col)
    fig.update_layout(title=title, height=360 * ((len(groups) + 1) // 2), width=900, template="plotly_white")
    return fig
