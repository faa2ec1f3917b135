"""et_circuits: find, explain and compare circuits in LLaMA-family models, on TransformerLens.

    import et_circuits as et
    model, tokenizer, spec = et.load("organism-llama")
    prompts = et.PromptSet(input_ids, answers, {"S2": s2_positions})
    scores = et.path_patch(model, clean, corrupt, "last")       # (layers x heads)

The methods are task-neutral functions of (model(s), PromptSets, named positions, heads,
metric): `sweep` (where in the prompt heads matter), `path_patch` / `find_circuit`,
`evaluate_circuit` (mean ablation), `dcm`, `cmap`, `knockout`. The paper's entity-tracking task and protocol live in `et.entity_tracking`.

Importing the package sets one thing in the process: the environment variable
OMP_WAIT_POLICY=PASSIVE unless it is set already (idle OpenMP workers otherwise spin, which makes
small models many times slower on shared CPUs; it must be set before torch is imported).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import entity_tracking, figures  # noqa: E402
from .circuit import Circuit  # noqa: E402
from .cross_model import CmapResult, Variant, cmap, cross_model_logits  # noqa: E402
from .component_masking import DCMConfig, DCMResult, Pairs, Question, dcm, dcm_many  # noqa: E402
from .position_sweep import Sweep, absolute_positions, smallest, sweep  # noqa: E402
from .errors import CircuitError, DataError, EtCircuitsError, SetupError  # noqa: E402
from .evaluation import (  # noqa: E402
    Evaluation, ablated_accuracies, ablated_accuracy, completeness, evaluate_circuit, minimal, position_means,
    random_circuit,
)
from .attention_knockout import Edge, knockout  # noqa: E402
from .metrics import accuracy, answer_prob, last_logits, logit_diff  # noqa: E402
from .models import load  # noqa: E402
from .path_patching import PAPER_STEPS, Step, find_circuit, path_patch, prepare, top_heads  # noqa: E402
from .prompts import PromptSet  # noqa: E402
from .settings import RunSettings  # noqa: E402
from .types import PAPER_GROUPS, GroupSpec, Head, Receiver  # noqa: E402

__all__ = [
    # models and prompts
    "load", "PromptSet", "RunSettings",
    # types
    "Circuit", "Head", "Receiver", "GroupSpec", "PAPER_GROUPS",
    # metrics
    "answer_prob", "logit_diff", "accuracy", "last_logits",
    # where the mechanism lives, path patching and discovery
    "sweep", "Sweep", "smallest", "absolute_positions",
    "path_patch", "prepare", "find_circuit", "Step", "PAPER_STEPS", "top_heads",
    # circuit evaluation
    "evaluate_circuit", "Evaluation", "ablated_accuracy", "ablated_accuracies", "position_means", "random_circuit",
    "minimal", "completeness",
    # DCM
    "dcm", "dcm_many", "Pairs", "Question", "DCMConfig", "DCMResult",
    # CMAP and knockout
    "cmap", "cross_model_logits", "Variant", "CmapResult", "knockout", "Edge",
    # errors
    "EtCircuitsError", "SetupError", "DataError", "CircuitError",
    # the paper's task, and every figure
    "entity_tracking", "figures",
]
