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
report page) and `pipeline` (the command line and its stages). Every name below loads its
module on first use, so `import et_circuits` is instant and the command line answers `--help`
without loading torch.

Importing the package sets one thing in the process: the environment variable
OMP_WAIT_POLICY=PASSIVE unless it is set already (idle OpenMP workers otherwise spin, which makes
small models many times slower on shared CPUs; it must be set before torch is imported).
"""

import importlib
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Public name -> (module, attribute; None: the module itself). Loaded on first use.
_PUBLIC = {
    # models, prompts and plain runs
    "load": ("et_circuits.models.loading", "load"),
    "PromptSet": ("et_circuits.core.prompts", "PromptSet"),
    "RunSettings": ("et_circuits.core.settings", "RunSettings"),
    "last_logits": ("et_circuits.core.forward", "last_logits"),
    "measure": ("et_circuits.core.forward", "measure"),
    # types
    "Circuit": ("et_circuits.core.circuit", "Circuit"),
    "Head": ("et_circuits.core.types", "Head"),
    "Receiver": ("et_circuits.core.types", "Receiver"),
    "GroupSpec": ("et_circuits.core.types", "GroupSpec"),
    "Step": ("et_circuits.core.types", "Step"),
    "PAPER_GROUPS": ("et_circuits.tasks.entity_tracking.paper", "PAPER_GROUPS"),
    "PAPER_STEPS": ("et_circuits.tasks.entity_tracking.paper", "PAPER_STEPS"),
    # metrics
    "answer_prob": ("et_circuits.core.metrics", "answer_prob"),
    "logit_diff": ("et_circuits.core.metrics", "logit_diff"),
    "accuracy": ("et_circuits.core.metrics", "accuracy"),
    # where the mechanism lives, path patching and discovery
    "sweep": ("et_circuits.methods.sweep", "sweep"),
    "Sweep": ("et_circuits.methods.sweep", "Sweep"),
    "smallest": ("et_circuits.methods.sweep", "smallest"),
    "absolute_positions": ("et_circuits.methods.sweep", "absolute_positions"),
    "path_patch": ("et_circuits.methods.path_patching", "path_patch"),
    "PathPatching": ("et_circuits.methods.path_patching", "PathPatching"),
    "top_heads": ("et_circuits.methods.path_patching", "top_heads"),
    "prepare_runs": ("et_circuits.core.prepared", "prepare_runs"),
    "prepare": ("et_circuits.core.prepared", "prepare_runs"),  # the name of earlier versions
    "find_circuit": ("et_circuits.methods.discovery", "find_circuit"),
    "FoundCircuit": ("et_circuits.methods.discovery", "FoundCircuit"),
    # circuit evaluation
    "evaluate_circuit": ("et_circuits.methods.evaluation", "evaluate_circuit"),
    "Evaluation": ("et_circuits.methods.evaluation", "Evaluation"),
    "ablated_accuracy": ("et_circuits.methods.evaluation", "ablated_accuracy"),
    "ablated_accuracies": ("et_circuits.methods.evaluation", "ablated_accuracies"),
    "ablated_scores": ("et_circuits.methods.evaluation", "ablated_scores"),
    "position_means": ("et_circuits.methods.evaluation", "position_means"),
    "random_circuit": ("et_circuits.methods.evaluation", "random_circuit"),
    "minimal": ("et_circuits.methods.minimality", "minimal"),
    "Minimality": ("et_circuits.methods.minimality", "Minimality"),
    "completeness": ("et_circuits.methods.minimality", "completeness"),
    "Completeness": ("et_circuits.methods.minimality", "Completeness"),
    # DCM
    "dcm": ("et_circuits.methods.dcm", "dcm"),
    "dcm_many": ("et_circuits.methods.dcm", "dcm_many"),
    "Pairs": ("et_circuits.methods.dcm", "Pairs"),
    "Question": ("et_circuits.methods.dcm", "Question"),
    "DCMConfig": ("et_circuits.methods.dcm", "DCMConfig"),
    "DCMResult": ("et_circuits.methods.dcm", "DCMResult"),
    # CMAP and knockout
    "cmap": ("et_circuits.methods.cmap", "cmap"),
    "cross_model_logits": ("et_circuits.methods.cmap", "cross_model_logits"),
    "Variant": ("et_circuits.methods.cmap", "Variant"),
    "CmapResult": ("et_circuits.methods.cmap", "CmapResult"),
    "knockout": ("et_circuits.methods.knockout", "knockout"),
    "Knockout": ("et_circuits.methods.knockout", "Knockout"),
    "Edge": ("et_circuits.methods.knockout", "Edge"),
    # errors
    "EtCircuitsError": ("et_circuits.core.errors", "EtCircuitsError"),
    "SetupError": ("et_circuits.core.errors", "SetupError"),
    "DataError": ("et_circuits.core.errors", "DataError"),
    "CircuitError": ("et_circuits.core.errors", "CircuitError"),
    # the paper's task, and every figure
    "entity_tracking": ("et_circuits.tasks.entity_tracking", None),
    "figures": ("et_circuits.presentation", None),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'et_circuits' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
