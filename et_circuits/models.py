"""Model registry and loading: every LLaMA variant, real or organism, becomes a HookedTransformer
through the same path (HF directory -> optional PEFT merge -> HookedTransformer without any
weight processing, so hook_z is comparable across models)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

from .errors import SetupError

ORGANISM_DIR = Path(__file__).parent / "organism" / "weights"
MODELS_DIR_VAR = "ET_CIRCUITS_MODELS"


@dataclass(frozen=True)
class ModelSpec:
    """Where one model's weights live. `base` names another spec when this one is a PEFT
    adapter (Goat): the adapter is then looked up here and merged into the base's weights."""

    name: str
    hf_repo: str | None = None
    local_dir: Path | None = None
    base: str | None = None

    @property
    def env_var(self) -> str:
        return "ET_CIRCUITS_" + self.name.upper().replace("-", "_")

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-7b", hf_repo="huggyllama/llama-7b"),
        ModelSpec("vicuna-7b", hf_repo="AlekseyKorshuk/vicuna-7b"),
        ModelSpec("goat-7b", hf_repo="tiedong/goat-lora-7b", base="llama-7b"),
        ModelSpec("float-7b", hf_repo="nikhil07prakash/float-7b"),
        ModelSpec("organism-llama", local_dir=ORGANISM_DIR / "organism-llama"),
        ModelSpec("organism-vicuna", local_dir=ORGANISM_DIR / "organism-vicuna"),
        ModelSpec("organism-goat", local_dir=ORGANISM_DIR / "organism-goat", base="organism-llama"),
        ModelSpec("organism-float", local_dir=ORGANISM_DIR / "organism-float"),
    ]
}
ORGANISM = [n for n in REGISTRY if n.startswith("organism-")]


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise SetupError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _hf_cache_dir(repo: str) -> Path | None:
    """A snapshot of `repo` already in the HF cache, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        return None


def candidate_dirs(spec: ModelSpec) -> list[tuple[str, Path | None]]:
    """Where `spec`'s directory is looked for, in order, as (description, path) pairs."""
    env = os.environ.get(spec.env_var)
    models_dir = os.environ.get(MODELS_DIR_VAR)
    found = [
        (f"${spec.env_var}", Path(env) if env else None),
        (f"${MODELS_DIR_VAR}/{spec.name}", Path(models_dir) / spec.name if models_dir else None),
    ]
    if spec.local_dir is not None:
        found.append(("the organism directory", spec.local_dir))
    if spec.hf_repo is not None:
        found.append((f"HF cache for {spec.hf_repo}", _hf_cache_dir(spec.hf_repo)))
    return found


def _unset(where: str) -> str:
    if where.startswith("HF cache"):
        from huggingface_hub.constants import HF_HUB_CACHE

        return f"not under {HF_HUB_CACHE}"
    return "unset"


def resolve_dir(spec: ModelSpec) -> Path:
    """The first existing directory for `spec`, or a SetupError listing every place searched."""
    searched = []
    for where, path in candidate_dirs(spec):
        if path is not None and any((path / f).exists() for f in ("config.json", "adapter_config.json")):
            return path
        searched.append(f"{where} ({path or _unset(where)})")
    hint = " (or `make organism` to train the organism)" if spec.local_dir is not None else ""
    raise SetupError(
        f"weights for {spec.name} not found; searched: {'; '.join(searched)}. "
        f"Set {spec.env_var}=/path/to/hf-dir or {MODELS_DIR_VAR}=/dir/containing/{spec.name}{hint}"
    )


def _check_llama(path: Path) -> dict:
    config = path / "config.json"
    if not config.exists():
        raise SetupError(f"{path} is not a HF checkpoint directory (no config.json)")
    cfg = json.loads(config.read_text())
    if cfg.get("model_type") != "llama":
        raise SetupError(
            f"{path} is not a LLaMA checkpoint (model_type={cfg.get('model_type')!r}); "
            "et_circuits handles LLaMA-architecture models"
        )
    return cfg


def load_hf(path: Path, dtype: torch.dtype = torch.float32, adapter: Path | None = None):
    """Load a LLaMA checkpoint with transformers; merge a PEFT adapter into it if given."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    _check_llama(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, local_files_only=True)
        model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if scaling not in (None, "default"):
        raise SetupError(f"rope scaling {scaling!r} is not supported")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", 10000.0))


def hooked_config(hf_config, device: str, dtype: torch.dtype) -> HookedTransformerConfig:
    """TransformerLens config from the checkpoint's own HF config (any LLaMA size, GQA too)."""
    c = hf_config
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=_rope_theta(c),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        device=device,
        dtype=dtype,
        default_prepend_bos=True,
    )


def to_hooked(hf_model, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Convert an HF LlamaForCausalLM to a HookedTransformer with no activation-changing
    processing (no fold_ln, no centering)."""
    cfg = hooked_config(hf_model.config, device, dtype)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    _copy_rotary_tables(hf_model, model)
    return model.to(device).eval()


@torch.no_grad()
def _copy_rotary_tables(hf_model, model: HookedTransformer) -> None:
    """Use the checkpoint's own cos/sin tables (HF computes them in float32 from its rope
    config, scaling variants included), so the two agree to rounding. Only the positions
    TransformerLens tabulates up front (2048 or n_ctx): longer prompts extend with its own."""
    n = model.blocks[0].attn.rotary_cos.shape[0]
    probe = torch.zeros(1, n, 1, dtype=model.cfg.dtype)
    cos, sin = hf_model.model.rotary_emb(probe, torch.arange(n)[None])
    for block in model.blocks:
        block.attn.rotary_cos = cos[0].to(model.cfg.dtype).clone()
        block.attn.rotary_sin = sin[0].to(model.cfg.dtype).clone()


def load(
    name_or_path: str | os.PathLike,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
):
    """Load a registered model (or a LLaMA HF directory) as (HookedTransformer, tokenizer, spec).

    `path` overrides where the weights are looked for (for an adapter spec: the adapter
    directory; its base is resolved through the registry).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = str(name_or_path)
    if name in REGISTRY:
        spec = REGISTRY[name]
    elif Path(name).is_dir():
        spec = ModelSpec(Path(name).name, local_dir=Path(name))
        if (Path(name) / "adapter_config.json").exists():
            raise SetupError(f"{name} is a PEFT adapter; register it with a base model to load it")
        path = name
    else:
        raise SetupError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    own_dir = Path(path) if path is not None else resolve_dir(spec)
    if spec.is_adapter:
        base_dir = resolve_dir(get_spec(spec.base))
        hf_model, tokenizer = load_hf(base_dir, dtype, adapter=own_dir)
    else:
        hf_model, tokenizer = load_hf(own_dir, dtype)
    model = to_hooked(hf_model, tokenizer, device, dtype)
    del hf_model
    return model, tokenizer, spec
