"""The paper's protocol on entity tracking, as short recipes over the task-neutral methods:
circuit discovery with minimality and completeness and Table 1 (`circuits`), the DCM runs behind
Figure 2 (`dcm`), the CMAP head sets of Figure 3 (`cmap`), the attention-knockout edges
(`knockout`), and the seeded prompt sets they all draw (`sampling`)."""

from ..paper import CMAP_SET_DESIDERATA as SET_DESIDERATA
from ..paper import CMAP_SET_ORDER as SET_ORDER
from ..paper import CMAP_SETS as SET_NAMES
from ..paper import FULL, PAPER_TOP_K
from .circuits import READINGS, SWEEP_POSITIONS, CircuitPlan, Discovery, discover, own_steps, table1_row
from .cmap import cmap_head_sets, variants
from .dcm import EXTRA_GROUP, Ask, DCMPlan, asks_for, run_dcm
from .knockout import EDGE_TITLES, EDGES, edges_to, with_random_context
from .sampling import SEED_OFFSETS, path_patching_prompts, prompts, prompts_for

__all__ = [
    "SEED_OFFSETS",
    "prompts",
    "prompts_for",
    "path_patching_prompts",
    "PAPER_TOP_K",
    "READINGS",
    "SWEEP_POSITIONS",
    "CircuitPlan",
    "Discovery",
    "discover",
    "own_steps",
    "table1_row",
    "EXTRA_GROUP",
    "Ask",
    "DCMPlan",
    "asks_for",
    "run_dcm",
    "FULL",
    "SET_DESIDERATA",
    "SET_NAMES",
    "SET_ORDER",
    "cmap_head_sets",
    "variants",
    "EDGES",
    "EDGE_TITLES",
    "edges_to",
    "with_random_context",
]
