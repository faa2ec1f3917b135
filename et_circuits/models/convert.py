"""Conversion of a loaded HF model (llama, mistral or qwen2) to a HookedTransformer with no
weight processing (no fold_ln, no centering), so hook_z is comparable across models. It copies
nothing: TransformerLens' weights are re-shaped views of the HF tensors. Also where the
converted model is exact (`check_fits`) and how it is split over GPUs (`block_devices`)."""

from __future__ import annotations

from itertools import chain
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import AbstractAttention
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from et_circuits.core.errors import SetupError


class Architecture(NamedTuple):
    """What TransformerLens is told about an HF architecture; the weights of all convert alike
    (biases where the checkpoint has them: Qwen2's q/k/v, LLaMA's with attention_bias)."""

    hf_class: str  # cfg.original_architecture
    prepend_bos: bool  # cfg.default_prepend_bos: Qwen2's tokenizer has no BOS token


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", True),
    "mistral": Architecture("MistralForCausalLM", True),
    "qwen2": Architecture("Qwen2ForCausalLM", False),
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# The most positions whose rotary tables are taken from the checkpoint: TransformerLens' own
# up-front table size, so its buffers keep their shape.
MAX_CONTEXT = AbstractAttention.ROTARY_INITIAL_CACHE_SIZE


def rope(hf_config) -> tuple[str, float, int]:
    """(rope type, theta, positions over which HF's rotary tables do not depend on the prompt's
    length). Dynamic NTK rescales beyond max_position_embeddings and longrope switches factors
    beyond original_max_position_embeddings; the other types are fixed tables."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise SetupError(f"rope scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    fixed = params["original_max_position_embeddings"] if kind == "longrope" else hf_config.max_position_embeddings
    return kind, theta, fixed


def hooked_config(hf_config, device: str, dtype: torch.dtype, n_devices: int = 1) -> HookedTransformerConfig:
    """TransformerLens config from the checkpoint's own HF config (any size, GQA too).

    n_ctx is the number of positions the conversion is exact for (see `check_fits`); a sliding
    window (Mistral, Qwen2 with use_sliding_window) is recorded as window_size while attention
    stays global, which equals it for prompts within the window.
    """
    c = hf_config
    _, theta, fixed = rope(c)
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    arch = ARCHITECTURES[c.model_type]
    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=min(c.max_position_embeddings, fixed, MAX_CONTEXT),
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=theta,
        final_rms=True,
        gated_mlp=True,
        window_size=window,
        original_architecture=arch.hf_class,
        device=device,
        n_devices=n_devices,
        dtype=dtype,
        default_prepend_bos=arch.prepend_bos,
    )


def to_hooked(
    hf_model, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32, n_devices: int = 1
) -> HookedTransformer:
    """Convert an HF model to a HookedTransformer with no activation-changing processing.

    The HookedTransformer is built on the meta device and takes the HF tensors themselves as
    its weights, moved to `device` and cast to `dtype` only where they differ: on the same
    device and dtype nothing is copied and the two models share memory (edit one in place and
    the other changes); on a GPU it is built there, one tensor at a time.

    `n_devices` > 1 splits the layers over that many GPUs from `device` on, as TransformerLens'
    forward expects (`block_devices`): the embedding with the first block, the final norm and
    the unembedding with the last.
    """
    check_split(device, n_devices, hf_model.config.num_hidden_layers)
    cfg = hooked_config(hf_model.config, device, dtype, n_devices)
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict(_state_dict(hf_model, cfg), strict=True, assign=True)  # every tensor (no meta left)
    placed = [{t.device for t in chain(b.parameters(), b.buffers())} for b in model.blocks]
    assert placed == [{d} for d in block_devices(cfg)], placed
    return model.eval()


@torch.no_grad()
def _state_dict(hf_model, cfg: HookedTransformerConfig) -> dict[str, Tensor]:
    """TransformerLens' state dict as views of the HF weights. TransformerLens' forward turns
    its shapes back into HF's layout, so views are also what it computes with fastest. Absent
    biases are zeros; tied embeddings get an unembedding of their own, so that W_E and W_U stay
    independent parameters as in any HookedTransformer."""

    devices = block_devices(cfg)
    at = devices[0]  # where `take` and `zeros` put what they make

    def take(t: Tensor) -> Tensor:
        return t.detach().to(device=at, dtype=cfg.dtype)

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, device=at, dtype=cfg.dtype)

    def bias(linear, *shape: int) -> Tensor:
        return zeros(*shape) if linear.bias is None else take(linear.bias).reshape(shape)

    n, n_kv, d_head = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head
    kv = "_" if cfg.n_key_value_heads else ""  # TransformerLens' names for grouped K/V weights
    heads_in, heads_out = "(n h) m -> n m h", "m (n h) -> n h m"
    inner = hf_model.model
    buffers = {d: _attention_buffers(hf_model, cfg, d) for d in dict.fromkeys(devices)}
    state = {"embed.W_E": take(inner.embed_tokens.weight)}
    for i, layer in enumerate(inner.layers):
        attn, mlp, p, at = layer.self_attn, layer.mlp, f"blocks.{i}.", devices[i]
        state |= {
            p + "ln1.w": take(layer.input_layernorm.weight),
            p + "ln2.w": take(layer.post_attention_layernorm.weight),
            p + "attn.W_Q": einops.rearrange(take(attn.q_proj.weight), heads_in, n=n),
            p + f"attn.{kv}W_K": einops.rearrange(take(attn.k_proj.weight), heads_in, n=n_kv),
            p + f"attn.{kv}W_V": einops.rearrange(take(attn.v_proj.weight), heads_in, n=n_kv),
            p + "attn.W_O": einops.rearrange(take(attn.o_proj.weight), heads_out, n=n),
            p + "attn.b_Q": bias(attn.q_proj, n, d_head),
            p + f"attn.{kv}b_K": bias(attn.k_proj, n_kv, d_head),
            p + f"attn.{kv}b_V": bias(attn.v_proj, n_kv, d_head),
            p + "attn.b_O": bias(attn.o_proj, cfg.d_model),
            p + "mlp.W_gate": take(mlp.gate_proj.weight).T,
            p + "mlp.W_in": take(mlp.up_proj.weight).T,
            p + "mlp.W_out": take(mlp.down_proj.weight).T,
            p + "mlp.b_in": zeros(cfg.d_mlp),
            p + "mlp.b_out": zeros(cfg.d_model),
        }
        state |= {p + "attn." + name: t for name, t in buffers[at].items()}
    at = devices[-1]
    state |= {"ln_final.w": take(inner.norm.weight)}
    unembed = take(hf_model.lm_head.weight).T
    tied = hf_model.lm_head.weight is inner.embed_tokens.weight
    state |= {"unembed.W_U": unembed.clone() if tied else unembed, "unembed.b_U": zeros(cfg.d_vocab)}
    return state


@torch.no_grad()
def _attention_buffers(hf_model, cfg: HookedTransformerConfig, device: torch.device) -> dict[str, Tensor]:
    """The buffers of every attention layer: TransformerLens' empty causal-mask placeholder and
    masking value, and the checkpoint's own rotary tables for positions 0..n_ctx-1 (HF computes
    them in float32 from its rope config, scaling included, and casts them to the model's
    dtype; one pair shared by the layers on `device`)."""
    probe = torch.zeros(1, cfg.n_ctx, 1, dtype=cfg.dtype, device=hf_model.device)
    positions = torch.arange(cfg.n_ctx, device=hf_model.device)[None]
    tables: tuple[Float[Tensor, "1 n_ctx d_head"], ...] = hf_model.model.rotary_emb(probe, positions)
    cos, sin = (t[0].to(device) for t in tables)
    return {
        "mask": torch.empty((0, 0), dtype=torch.bool, device=device),
        "IGNORE": torch.tensor(-torch.inf, device=device),
        "rotary_cos": cos,
        "rotary_sin": sin,
    }


def block_devices(cfg: HookedTransformerConfig) -> list[torch.device]:
    """The device of each block: all on cfg.device, or with n_devices > 1 consecutive layers
    per GPU from cfg.device's index on (TransformerLens' `get_device_for_block_index`, which
    its forward moves the residual stream by)."""
    return [get_device_for_block_index(i, cfg) for i in range(cfg.n_layers)]


def check_split(device: str, n_devices: int, n_layers: int) -> None:
    """SetupError (one line) unless a model of n_layers can be split over n_devices GPUs from
    `device` on."""
    if n_devices == 1:
        return
    parsed = torch.device(device)
    if n_devices < 1 or parsed.type != "cuda":
        raise SetupError(f"--n-devices {n_devices} needs CUDA GPUs (device {device!r}); use 1 on {parsed.type}")
    if n_devices > n_layers:
        raise SetupError(f"--n-devices {n_devices} is more devices than the model's {n_layers} layers")
    first, found = parsed.index or 0, torch.cuda.device_count()
    if first + n_devices > found:
        raise SetupError(
            f"splitting over {n_devices} GPUs from cuda:{first} needs cuda:{first}..cuda:{first + n_devices - 1}, "
            f"but this machine has {found} GPU(s)"
        )


def check_fits(model: HookedTransformer, n_tokens: int) -> None:
    """Refuse, in one line, prompts longer than the converted model reproduces its checkpoint
    for: its sliding window (run as global attention, equal to it only within the window) and
    n_ctx (the positions whose rotary tables come from the checkpoint)."""
    cfg = model.cfg
    if cfg.window_size is not None and n_tokens > cfg.window_size:
        raise SetupError(
            f"prompts of {n_tokens} tokens are longer than the sliding window of {cfg.model_name} "
            f"({cfg.window_size} tokens), which is converted as global attention: use shorter prompts"
        )
    if n_tokens > cfg.n_ctx:
        raise SetupError(
            f"prompts of {n_tokens} tokens are longer than n_ctx of {cfg.model_name} ({cfg.n_ctx}), the positions "
            f"whose rotary tables come from the checkpoint (at most {MAX_CONTEXT}, fewer where dynamic or "
            "longrope scaling changes them with the prompt's length): use shorter prompts"
        )
