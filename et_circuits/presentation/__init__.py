"""Plotly figures, one module per stage (`circuit`, `attribution`, `dcm`, `cmap`, `knockout`), how they are
written (`save`) and the report page (`report`). Each figure function takes results (result
types, circuits, pandas frames) and returns a plotly figure, so a notebook can show it inline.
`import et_circuits as et; et.figures` is this package."""

from .attribution import attribution_scatter
from .circuit import circuit_diagram, completeness_figure, step_heatmaps, sweep_heatmap, table_figure
from .cmap import PATCH_TITLES, cmap_figure, input_patching_figure
from .dcm import DESIDERATUM_COLORS, extra_figure, figure2
from .knockout import knockout_figure
from .save import FIGURES_ENV, figures_dir, save_figure, save_figures, start_browser

__all__ = [
    "step_heatmaps",
    "attribution_scatter",
    "circuit_diagram",
    "table_figure",
    "completeness_figure",
    "sweep_heatmap",
    "figure2",
    "extra_figure",
    "DESIDERATUM_COLORS",
    "cmap_figure",
    "input_patching_figure",
    "PATCH_TITLES",
    "knockout_figure",
    "save_figure",
    "save_figures",
    "start_browser",
    "figures_dir",
    "FIGURES_ENV",
]
