"""Models: an HF directory of a supported family (LLaMA, Mistral, Qwen2/3, OLMo-2, Phi-3,
Gemma-2/3; or base + PEFT adapter) becomes a HookedTransformer (`load`); `registry` says which
models exist and where their weights are (`ModelSpec`), `families` what TransformerLens is told
about each architecture, `convert` turns an HF model into a HookedTransformer without weight
processing."""

from .convert import ARCHITECTURES, block_devices, check_fits, check_split, hooked_config, to_hooked
from .loading import load, load_hf
from .registry import (
    MODELS_DIR_VAR,
    ORGANISM,
    ORGANISM_DIR,
    REGISTRY,
    REGISTRY_VAR,
    ModelSpec,
    candidate_dirs,
    get_spec,
    read_registry,
    registered,
    resolve_dir,
    result_name,
    use_registry,
)

__all__ = [
    "load",
    "load_hf",
    "to_hooked",
    "hooked_config",
    "block_devices",
    "check_fits",
    "check_split",
    "ARCHITECTURES",
    "ModelSpec",
    "REGISTRY",
    "ORGANISM",
    "ORGANISM_DIR",
    "MODELS_DIR_VAR",
    "REGISTRY_VAR",
    "candidate_dirs",
    "get_spec",
    "read_registry",
    "registered",
    "resolve_dir",
    "result_name",
    "use_registry",
]
