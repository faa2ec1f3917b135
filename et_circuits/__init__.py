"""et_circuits: find, explain and compare circuits in LLaMA, Mistral, Qwen, OLMo-2, Phi-3 and
Gemma models and their fine-tunes, on TransformerLens.

    import et_circuits as et
    model, tokenizer, spec = et.load("organism-llama")
    prompts = et.PromptSet(input_ids, answers, {"S2": s2_positions})
    result = et.path_patch(model, clean, corrupt, "last")       # scores: (layers x heads)

The methods are task-neutral functions of (model(s), PromptSets, named positions, heads,
metric): `sweep` (where in the prompt heads matter), `path_patch` / `find_circuit`,
`evaluate_circuit` (mean ablation), `minimal` / `completeness`, `dcm`, `cmap`, `knockout`.
The package is layered, each layer importing only the ones below it: `core` (types, prompts,
hooks, restarts, metrics), `models` (loading), `methods`, `tasks` (the paper's entity-tracking
task and protocol: `et.entity_tracking`), `presentation` (figures: `et.figures`, and the
report page) and `pipeline` (the command line and its stages). `et.entity_tracking` and
`et.figures` load on first use, so `import et_circuits` loads neither plotly nor the protocol.

Importing the package sets one thing in the process: the environment variable
OMP_WAIT_POLICY=PASSIVE unless it is set already (idle OpenMP workers otherwise spin, which makes
small models many times slower on shared CPUs; it must be set before torch is imported).
"""

import importlib
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .core.circuit import Circuit  # noqa: E402
from .core.errors import CircuitError, DataError, EtCircuitsError, SetupError  # noqa: E402
from .core.forward import last_logits, measure  # noqa: E402
from .core.metrics import accuracy, answer_prob, logit_diff  # noqa: E402
from .core.prepared import prepare_runs  # noqa: E402
from .core.prompts import PromptSet  # noqa: E402
from .core.settings import RunSettings  # noqa: E402
from .core.types import GroupSpec, Head, Receiver  # noqa: E402
from .methods.cmap import CmapResult, Variant, cmap, cross_model_logits  # noqa: E402
from .methods.dcm import DCMConfig, DCMResult, Pairs, Question, dcm, dcm_many  # noqa: E402
from .methods.discovery import Step, find_circuit  # noqa: E402
from .methods.evaluation import (  # noqa: E402
    Evaluation,
    ablated_accuracies,
    ablated_accuracy,
    evaluate_circuit,
    position_means,
    random_circuit,
)
from .methods.knockout import Edge, knockout  # noqa: E402
from .methods.minimality import completeness, minimal  # noqa: E402
from .methods.path_patching import path_patch, top_heads  # noqa: E402
from .methods.sweep import Sweep, absolute_positions, smallest, sweep  # noqa: E402
from .models import load  # noqa: E402

prepare = prepare_runs  # the name of earlier versions

# Loaded on first use: the paper's task and protocol, its tables, and every figure (plotly).
_LAZY = {
    "entity_tracking": ("et_circuits.tasks.entity_tracking", None),
    "figures": ("et_circuits.presentation", None),
    "PAPER_GROUPS": ("et_circuits.tasks.entity_tracking.paper", "PAPER_GROUPS"),
    "PAPER_STEPS": ("et_circuits.tasks.entity_tracking.paper", "PAPER_STEPS"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'et_circuits' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    # models, prompts and plain runs
    "load",
    "PromptSet",
    "RunSettings",
    "last_logits",
    "measure",
    # types
    "Circuit",
    "Head",
    "Receiver",
    "GroupSpec",
    "PAPER_GROUPS",
    # metrics
    "answer_prob",
    "logit_diff",
    "accuracy",
    # where the mechanism lives, path patching and discovery
    "sweep",
    "Sweep",
    "smallest",
    "absolute_positions",
    "path_patch",
    "prepare",
    "prepare_runs",
    "find_circuit",
    "Step",
    "PAPER_STEPS",
    "top_heads",
    # circuit evaluation
    "evaluate_circuit",
    "Evaluation",
    "ablated_accuracy",
    "ablated_accuracies",
    "position_means",
    "random_circuit",
    "minimal",
    "completeness",
    # DCM
    "dcm",
    "dcm_many",
    "Pairs",
    "Question",
    "DCMConfig",
    "DCMResult",
    # CMAP and knockout
    "cmap",
    "cross_model_logits",
    "Variant",
    "CmapResult",
    "knockout",
    "Edge",
    # errors
    "EtCircuitsError",
    "SetupError",
    "DataError",
    "CircuitError",
    # the paper's task, and every figure
    "entity_tracking",
    "figures",
]
