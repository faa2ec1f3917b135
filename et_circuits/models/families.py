"""The HF architectures the conversion reproduces, and what TransformerLens is told about each:
`ARCHITECTURES` (one `Architecture` per model_type), the checkpoint's rope scaling (`rope`), its
sliding window, and `hooked_config`, the HookedTransformerConfig of a checkpoint.

Every family is a pre-norm or post-norm decoder with RMSNorm, rotary embeddings and a gated MLP;
they differ in where the norms sit, whether queries and keys are normalised, and Gemma's
scalings. TransformerLens 3.9 represents each of those with a config flag (`use_qk_norm`,
`use_normalization_before_and_after`, the soft caps, `attn_scale`, `rotary_dim`) or, for
OLMo-2's post-norm block and its q/k norm over all heads, by `original_architecture`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens.components import AbstractAttention
from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

from et_circuits.core.errors import SetupError


class Architecture(NamedTuple):
    """What differs between the HF architectures; their weights all convert alike (biases where
    the checkpoint has them: Qwen2's q/k/v, LLaMA's, Qwen3's or OLMo-2's with attention_bias;
    Phi-3's fused qkv_proj and gate_up_proj are split into views)."""

    hf_class: str  # cfg.original_architecture
    prepend_bos: bool  # cfg.default_prepend_bos: the Qwen and OLMo-2 tokenizers add no BOS token
    norms: str = "pre"  # which RMSNorms a block has and where (`NORMS`)
    qk_norm: str | None = None  # "head": RMSNorm of each head's q / k (Qwen3, Gemma-3); "all": of all heads' (OLMo-2)
    gemma: bool = False  # RMSNorm scales by (1 + w); attention scaled by query_pre_attn_scalar
    attn_softcap: bool = False  # HF applies attn_logit_softcapping (Gemma-2; Gemma-3's attention ignores it)
    rope_per_layer_type: bool = False  # rotary tables differ between sliding and full attention layers (Gemma-3)
    partial_rotary: bool = False  # only the first partial_rotary_factor of each head is rotated (Phi-3)
    final_softcap: bool = True  # HF applies final_logit_softcapping where the config has one


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", True),
    "mistral": Architecture("MistralForCausalLM", True),
    "qwen2": Architecture("Qwen2ForCausalLM", False),
    "qwen3": Architecture("Qwen3ForCausalLM", False, qk_norm="head"),
    "olmo2": Architecture("Olmo2ForCausalLM", False, norms="post", qk_norm="all"),
    "phi3": Architecture("Phi3ForCausalLM", True, partial_rotary=True),
    "gemma2": Architecture("Gemma2ForCausalLM", True, norms="sandwich", gemma=True, attn_softcap=True),
    "gemma3_text": Architecture(
        "Gemma3ForCausalLM", True, norms="sandwich", qk_norm="head", gemma=True, rope_per_layer_type=True
    ),
    # Gemma-3 4B and larger: the image-text model, converted as its language model (text prompts
    # only); its forward applies no final logit soft cap (Gemma3ForCausalLM's does)
    "gemma3": Architecture(
        "Gemma3ForConditionalGeneration",
        True,
        norms="sandwich",
        qk_norm="head",
        gemma=True,
        rope_per_layer_type=True,
        final_softcap=False,
    ),
}
# TransformerLens' norm of each block (its state-dict name) -> the HF decoder layer's norm.
NORMS = {
    # ln1 before attention, ln2 before the MLP
    "pre": {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
    # OLMo-2: ln1 after attention, ln2 after the MLP, both before the residual add
    "post": {"ln1": "post_attention_layernorm", "ln2": "post_feedforward_layernorm"},
    # Gemma-2/3: before and after each sublayer
    "sandwich": {
        "ln1": "input_layernorm",
        "ln1_post": "post_attention_layernorm",
        "ln2": "pre_feedforward_layernorm",
        "ln2_post": "post_feedforward_layernorm",
    },
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# The most positions whose rotary tables are taken from the checkpoint: TransformerLens' own
# up-front table size, so its buffers keep their shape.
MAX_CONTEXT = AbstractAttention.ROTARY_INITIAL_CACHE_SIZE


def architecture(hf_config) -> Architecture:
    """The architecture of a checkpoint's config (of an image-text model: the model's; its
    text config, which everything else here reads, is the language model's)."""
    return ARCHITECTURES[hf_config.model_type]


def text_config(hf_config):
    """The config of the language model: the config itself, or an image-text model's text_config."""
    return hf_config.get_text_config()


def rope_layer_types(hf_config) -> list[str | None]:
    """The keys of the checkpoint's rope parameters: one per layer type where they differ
    between layer types (Gemma-3), else just None."""
    if architecture(hf_config).rope_per_layer_type:
        return sorted(set(hf_config.layer_types))
    return [None]


def layer_type(hf_config, layer: int) -> str | None:
    """The rope key of a layer (`rope_layer_types`)."""
    return hf_config.layer_types[layer] if architecture(hf_config).rope_per_layer_type else None


def rope(hf_config, layer_type: str | None = None) -> tuple[str, float, int]:
    """(rope type, theta, positions over which HF's rotary tables do not depend on the prompt's
    length) of all layers, or of one layer type (Gemma-3). Dynamic NTK rescales beyond
    max_position_embeddings and longrope switches factors beyond original_max_position_embeddings;
    the other types are fixed tables."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise SetupError(f"rope scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    fixed = hf_config.max_position_embeddings
    if kind == "longrope":
        fixed = params.get("original_max_position_embeddings") or hf_config.original_max_position_embeddings
    return kind, theta, fixed


def rotary_dim(hf_config, d_head: int) -> int:
    """The dimensions of each head that are rotated: all, or Phi-3's partial_rotary_factor of them."""
    if not architecture(hf_config).partial_rotary:
        return d_head
    params = getattr(hf_config, "rope_parameters", None) or {}
    return int(d_head * params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))


def sliding_window(hf_config) -> int | None:
    """The window of the checkpoint's sliding-window layers (Mistral, Phi-3, Gemma-2/3, Qwen with
    use_sliding_window), None if no layer slides."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None or not getattr(hf_config, "use_sliding_window", True):
        return None
    types = getattr(hf_config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return window


def activation(hf_config) -> str:
    """The MLP's activation (Gemma names it hidden_activation), refused in one line where
    TransformerLens has no such function."""
    name = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
    if name not in SUPPORTED_ACTIVATIONS:
        raise SetupError(f"activation {name!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    return name


def hooked_config(hf_config, device: str, dtype: torch.dtype, n_devices: int = 1) -> HookedTransformerConfig:
    """TransformerLens config from the checkpoint's own HF config (any size, GQA too).

    n_ctx is the number of positions the conversion is exact for (see `convert.check_fits`); a
    sliding window is recorded as window_size while attention stays global, which equals it
    for prompts within the window. Gemma's soft caps and query_pre_attn_scalar are TransformerLens
    flags; its embedding scale and (1 + w) norms are in the weights (`convert`).
    """
    arch, c = architecture(hf_config), text_config(hf_config)
    ropes = {t: rope(c, t) for t in rope_layer_types(c)}
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    extra = {}
    if arch.gemma:
        extra["attn_scale"] = math.sqrt(c.query_pre_attn_scalar)
    if arch.attn_softcap and c.attn_logit_softcapping is not None:
        extra["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
    if arch.final_softcap and getattr(c, "final_logit_softcapping", None) is not None:
        extra["output_logits_soft_cap"] = float(c.final_logit_softcapping)
    if "sliding_attention" in ropes:
        extra["rotary_base_local"] = ropes["sliding_attention"][1]
    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=min(c.max_position_embeddings, *(fixed for _, _, fixed in ropes.values()), MAX_CONTEXT),
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=activation(c),
        n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=rotary_dim(c, d_head),
        rotary_base=ropes.get("full_attention", next(iter(ropes.values())))[1],
        final_rms=True,
        gated_mlp=True,
        use_qk_norm=arch.qk_norm == "head",
        use_normalization_before_and_after=arch.norms == "sandwich",
        window_size=sliding_window(c),
        original_architecture=arch.hf_class,
        device=device,
        n_devices=n_devices,
        dtype=dtype,
        default_prepend_bos=arch.prepend_bos,
        **extra,
    )
