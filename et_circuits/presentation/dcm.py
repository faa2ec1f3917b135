"""Figures of the DCM stage (frames as `dcm-figure` writes dcm.csv): the paper's Figure 2 and
group B on every desideratum."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from et_circuits.tasks.entity_tracking import desiderata, recipe

from .style import empty_panel, group_title

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
        rows=1,
        cols=max(len(groups), 1),
        shared_yaxes=True,
        subplot_titles=[group_title(g) for g in groups],
    )
    for col, group in enumerate(groups, start=1):
        if not (rows[rows.group == group].group_size > 0).any():  # an empty group: said, not drawn
            empty_panel(fig, col, "no heads in this group")
            fig.update_xaxes(showticklabels=False, row=1, col=col)
            continue
        for desideratum in desiderata.MAIN:
            sel = rows[(rows.group == group) & (rows.desideratum == desideratum)].set_index("model").reindex(models)
            fig.add_trace(
                go.Bar(
                    x=models,
                    y=sel.accuracy_mean,
                    error_y=dict(type="data", array=sel.accuracy_std),
                    name=desideratum.replace("_", " "),
                    legendgroup=desideratum,
                    showlegend=col == 1,
                    marker_color=DESIDERATUM_COLORS[desideratum],
                    customdata=sel[["n_selected", "group_size"]].to_numpy(),
                    hovertemplate="%{x}: %{y:.1f}% (%{customdata[0]} of %{customdata[1]} heads)<extra></extra>",
                ),
                row=1,
                col=col,
            )
    base = rows.circuit_of.iloc[0] if len(rows) else ""
    fig.update_layout(
        title=f"DCM on the {base} circuit {where}<br><sup>accuracy when the selected heads are patched, "
        "mean ± std over resamplings</sup>",
        barmode="group",
        height=460,
        legend=dict(orientation="h", y=-0.3),
        width=max(900, 330 * len(groups)),
        template="plotly_white",
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
        fig.add_trace(
            go.Bar(
                x=[n.replace("_", " ") for n in names],
                y=sel.accuracy_mean,
                error_y=dict(type="data", array=sel.accuracy_std),
                name=model,
            )
        )
    fig.update_layout(
        title="Group B (position transmitter) on every desideratum<br><sup>controls: is not in, wrong segment</sup>",
        barmode="group",
        height=450,
        width=1100,
        template="plotly_white",
        yaxis=dict(range=[0, 100], title="accuracy (% of target)"),
    )
    return fig
