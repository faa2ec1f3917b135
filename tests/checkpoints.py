"""Tiny random HF checkpoints of every architecture the loader supports, and PEFT LoRA adapters
for them, saved on the fly with the organism tokenizer (2 layers, d_model 32 by default).

Weights are drawn with std 0.2 (HF's default 0.02 leaves logits so flat that a conversion
error could hide inside the tolerance) and biases, which HF initialises to zero, at random; so
are norm weights (HF makes them 1, Gemma 0 as it scales by 1 + w), so that a norm converted in
the wrong place or without Gemma's offset shows in the logits."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer


def gemma3_image_text_config(**text) -> Gemma3Config:
    """Gemma-3 4B's layout (an image-text model) around a tiny text config: a one-layer vision
    tower whose 28-pixel images make 4 tokens (the text-only prompts here never use it)."""
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    tie = text.pop("tie_word_embeddings", True)
    return Gemma3Config(
        text_config=Gemma3TextConfig(**text),
        vision_config=vision,
        mm_tokens_per_image=4,
        initializer_range=text.get("initializer_range", 0.02),
        tie_word_embeddings=tie,
    )


CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "gemma3": (gemma3_image_text_config, Gemma3ForConditionalGeneration),
}
# Config fields whose HF defaults fit only full-size models: a head size of its own (Qwen3, Gemma
# default to 128 / 256, not d_model / n_heads). Gemma keeps query_pre_attn_scalar 256 (not d_head),
# so the tests see that scale taken from the checkpoint.
HEAD_DIM = ("qwen3", "gemma2", "gemma3_text", "gemma3")
# LoRA targets of the families the loader supported first; the others' adapters are on every
# linear layer but the unembedding, so the MLP (Phi-3's fused qkv_proj and gate_up_proj too) is
# merged as well.
QKVO = {arch: ["q_proj", "k_proj", "v_proj", "o_proj"] for arch in ("llama", "mistral", "qwen2")}
N_POSITIONS = 128  # max_position_embeddings of every checkpoint here, unless asked otherwise
# The session fixture `tiny` (conftest): HF's own init (std 0.02) and 512 positions.
TINY = dict(initializer_range=0.02, max_position_embeddings=512)


def make(
    path,
    arch: str = "llama",
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_model: int = 32,
    n_layers: int = 2,
    seed: int = 0,
    **config,
):
    """Save a random `arch` model (`config`: further HF config fields, e.g. rope_parameters, or
    other values of initializer_range / max_position_embeddings) and the organism tokenizer to
    `path`; return the HF model, fp32, in eval mode."""
    tok = build_tokenizer()
    config_class, model_class = CLASSES[arch]
    fields = dict(max_position_embeddings=N_POSITIONS, initializer_range=0.2)
    if arch in HEAD_DIM:
        fields["head_dim"] = d_model // n_heads
    cfg = config_class(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**fields, **config},
    )
    torch.manual_seed(seed)
    hf = model_class(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif "norm" in name and cfg.initializer_range >= 0.1:  # not with HF's own init (`TINY`)
                p.add_(torch.randn_like(p), alpha=0.1)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf


def make_adapter(hf, path, seed: int = 1) -> None:
    """Save a LoRA adapter (r 8; on q/k/v/o, or every linear layer: `QKVO`) for `hf` to `path`,
    with random A and B (B is zero at init, which would make the adapter do nothing). `hf`
    itself is left unchanged."""
    from peft import LoraConfig, get_peft_model

    base = type(hf)(hf.config)
    base.load_state_dict(hf.state_dict())
    targets = QKVO.get(hf.config.model_type, "all-linear")
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    lora.save_pretrained(path)
