"""The results layout, in one place: where every stage's files go under RESULTS/ and FIGURES/,
what they are called, and their formats (typed readers and writers, and the reuse keys that
decide whether finished work is reused). Stages, figures and the report read through here:
`layout` (folders, names, circuits, path-patching steps), `dcm` (dcm_runs.json, dcm.json) and
`rows` (cmap.csv, knockout.csv).

RESULTS/
  <model>/                    the circuit at the paper's positions (reading "paper")
    circuit.json, minimality.json, completeness.json, path_patching/<group>.safetensors
    discovered/               the same at the positions a sweep discovered, and sweep.json
    dcm.json, dcm_runs.json   DCM (per model), means-<digest>.safetensors (ablation means)
  table1.csv, table1.md, overlap.csv, dcm.csv, cmap.csv, knockout.csv
FIGURES/<stem>.{html,json,png}, report.html
"""

from __future__ import annotations

from .dcm import (
    RUN_KEY_IGNORES,
    SECTIONS,
    SECTIONS_OF,
    RunsFile,
    check_dcm_matches,
    dcm_entry,
    dcm_rows,
    dcm_run_key,
    read_dcm,
    read_runs,
    readings_in,
    seed_from_json,
    seed_to_json,
    selected_heads,
)
from .layout import (
    ATTRIBUTION_FIGURE,
    CIRCUIT,
    CMAP_CSV,
    CMAP_INPUT_FIGURE,
    COMPLETENESS,
    DCM,
    DCM_CSV,
    DCM_EXTRA_FIGURE,
    DCM_RUNS,
    KNOCKOUT_CSV,
    KNOCKOUT_FIGURE,
    MINIMALITY,
    OVERLAP,
    READING_DIRS,
    STEPS_DIR,
    SWEEP,
    SWEEP_FIGURE,
    TABLE1,
    TABLE1_COLUMNS,
    TABLE1_FIGURE,
    TABLE1_MD,
    circuit_path,
    figure_stem,
    first_step_metadata,
    load_circuit,
    load_scores,
    read_json_or_empty,
    read_step_scores,
    reading_dir,
    stage_stem,
    step_files,
    step_key,
    step_metadata,
    step_path,
    write_discovery,
)
from .rows import (
    cmap_rows,
    knockout_rows,
)

__all__ = [
    "ATTRIBUTION_FIGURE",
    "CIRCUIT",
    "CMAP_CSV",
    "CMAP_INPUT_FIGURE",
    "COMPLETENESS",
    "DCM",
    "DCM_CSV",
    "DCM_EXTRA_FIGURE",
    "DCM_RUNS",
    "KNOCKOUT_CSV",
    "KNOCKOUT_FIGURE",
    "MINIMALITY",
    "OVERLAP",
    "READING_DIRS",
    "RUN_KEY_IGNORES",
    "RunsFile",
    "SECTIONS",
    "SECTIONS_OF",
    "STEPS_DIR",
    "SWEEP",
    "SWEEP_FIGURE",
    "TABLE1",
    "TABLE1_COLUMNS",
    "TABLE1_FIGURE",
    "TABLE1_MD",
    "check_dcm_matches",
    "circuit_path",
    "cmap_rows",
    "dcm_entry",
    "dcm_rows",
    "dcm_run_key",
    "figure_stem",
    "first_step_metadata",
    "knockout_rows",
    "load_circuit",
    "load_scores",
    "read_dcm",
    "read_json_or_empty",
    "read_runs",
    "read_step_scores",
    "reading_dir",
    "readings_in",
    "seed_from_json",
    "seed_to_json",
    "selected_heads",
    "stage_stem",
    "step_files",
    "step_key",
    "step_metadata",
    "step_path",
    "write_discovery",
]
