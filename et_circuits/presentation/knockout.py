"""Figure of the knockout stage (frames as `knockout` writes knockout.csv)."""

from __future__ import annotations

import plotly.graph_objects as go

from et_circuits.tasks.entity_tracking import recipe


def knockout_figure(frame):
    """Accuracy vs the first blocked layer, one line per edge; dashed: the unblocked model."""
    fig = go.Figure()
    for edge, rows in frame.groupby("edge", sort=False):
        fig.add_trace(
            go.Scatter(
                x=rows["from_layer"], y=rows["accuracy"], mode="lines+markers", name=recipe.EDGE_TITLES.get(edge, edge)
            )
        )
    full = float(frame["full_accuracy"].iloc[0])
    fig.add_hline(y=full, line_dash="dash", line_color="grey", annotation_text=f"no knockout {full:.2f}")
    model = ", ".join(dict.fromkeys(frame["model"]))
    fig.update_layout(
        title=f"Attention knockout in {model}<br><sup>one edge blocked in every head of layers L and above</sup>",
        xaxis_title="first blocked layer L",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.05],
        xaxis=dict(dtick=1 if frame["from_layer"].max() < 16 else None),
        template="plotly_white",
        height=480,
        width=700,
        legend=dict(orientation="h", y=-0.2),
    )
    return fig
