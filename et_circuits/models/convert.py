"""Conversion of a loaded HF model (any family in `families.ARCHITECTURES`) to a HookedTransformer
with no weight processing (no fold_ln, no centering), so hook_z is comparable across models. It
copies no matrix: TransformerLens' weights are re-shaped views of the HF tensors (Gemma's scaled
embedding aside). Also where the converted model is exact (`check_fits`) and how it is split
over GPUs (`block_devices`)."""

from __future__ import annotations

from itertools import chain

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import RMSNorm
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from et_circuits.core.errors import SetupError

from .families import ARCHITECTURES, MAX_CONTEXT, NORMS, architecture, hooked_config, layer_type, rope, text_config

__all__ = ["ARCHITECTURES", "hooked_config", "rope", "to_hooked", "block_devices", "check_split", "check_fits"]


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
    check_split(device, n_devices, text_config(hf_model.config).num_hidden_layers)
    cfg = hooked_config(hf_model.config, device, dtype, n_devices)
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        if architecture(hf_model.config).qk_norm == "all" and cfg.n_key_value_heads is not None:
            for block in model.blocks:
                block.attn.k_norm = SharedKeyNorm(cfg, cfg.n_key_value_heads * cfg.d_head)
    model.load_state_dict(_state_dict(hf_model, cfg), strict=True, assign=True)  # every tensor (no meta left)
    placed = [{t.device for t in chain(b.parameters(), b.buffers())} for b in model.blocks]
    assert placed == [{d} for d in block_devices(cfg)], placed
    return model.eval()


def decoder(hf_model):
    """The HF decoder stack (embeddings, layers, final norm, rotary tables): `model`, or an
    image-text model's `model.language_model` (its vision tower is left unused)."""
    return getattr(hf_model.model, "language_model", hf_model.model)


class SharedKeyNorm(RMSNorm):
    """OLMo-2's key norm over all key/value heads together, also on keys made one per query head
    (`ungroup_grouped_query_attention`, which TransformerLens' own k_norm cannot take): a
    key/value head repeated once per query head that shares it has the same mean square, so
    the norm repeats its weight alike and gives each copy what the shared head gets."""

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        if x.shape[-1] == self.length:
            return super().forward(x)
        w = self.w.reshape(-1, self.cfg.d_head).repeat_interleave(x.shape[-1] // self.length, 0).flatten()
        if self.cfg.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale).to(self.cfg.dtype) * w


@torch.no_grad()
def _state_dict(hf_model, cfg: HookedTransformerConfig) -> dict[str, Tensor]:
    """TransformerLens' state dict as views of the HF weights. TransformerLens' forward turns
    its shapes back into HF's layout, so views are also what it computes with fastest. Absent
    biases are zeros; fused projections (Phi-3) are split into views; tied embeddings get an
    unembedding of their own, so that W_E and W_U stay independent parameters as in any
    HookedTransformer. Gemma's embedding scale (the embedding is then a new tensor, in the
    model's dtype, as HF computes it) and (1 + w) norm weights are folded in: both change the
    representation of a weight, not any activation."""

    devices = block_devices(cfg)
    at = devices[0]  # where `take` and `zeros` put what they make
    arch = architecture(hf_model.config)

    def take(t: Tensor) -> Tensor:
        return t.detach().to(device=at, dtype=cfg.dtype)

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, device=at, dtype=cfg.dtype)

    def norm(module) -> Tensor:  # Gemma's RMSNorm multiplies by (1 + w), in float32
        w = module.weight.detach()
        return (1.0 + w.to(at, torch.float32)).to(cfg.dtype) if arch.gemma else take(w)

    n, n_kv, d_head = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head
    kv = "_" if cfg.n_key_value_heads else ""  # TransformerLens' names for grouped K/V weights
    heads_in, heads_out = "(n h) m -> n m h", "m (n h) -> n h m"
    inner = decoder(hf_model)
    types = [layer_type(text_config(hf_model.config), i) for i in range(cfg.n_layers)]
    buffers = {(d, t): _attention_buffers(hf_model, cfg, d, t) for d, t in dict.fromkeys(zip(devices, types))}
    embed = take(inner.embed_tokens.weight)
    scale = getattr(inner.embed_tokens, "embed_scale", None)  # Gemma: sqrt(d_model), in the weights' dtype
    state = {"embed.W_E": embed if scale is None else embed * scale.to(embed.device, embed.dtype)}
    for i, layer in enumerate(inner.layers):
        attn, mlp, p, at = layer.self_attn, layer.mlp, f"blocks.{i}.", devices[i]
        state |= {p + name + ".w": norm(getattr(layer, hf_name)) for name, hf_name in NORMS[arch.norms].items()}
        (w_q, w_k, w_v), (b_q, b_k, b_v) = _qkv(attn, cfg)
        state |= {
            p + "attn.W_Q": einops.rearrange(take(w_q), heads_in, n=n),
            p + f"attn.{kv}W_K": einops.rearrange(take(w_k), heads_in, n=n_kv),
            p + f"attn.{kv}W_V": einops.rearrange(take(w_v), heads_in, n=n_kv),
            p + "attn.W_O": einops.rearrange(take(attn.o_proj.weight), heads_out, n=n),
            p + "attn.b_Q": zeros(n, d_head) if b_q is None else take(b_q).reshape(n, d_head),
            p + f"attn.{kv}b_K": zeros(n_kv, d_head) if b_k is None else take(b_k).reshape(n_kv, d_head),
            p + f"attn.{kv}b_V": zeros(n_kv, d_head) if b_v is None else take(b_v).reshape(n_kv, d_head),
            p + "attn.b_O": zeros(cfg.d_model) if attn.o_proj.bias is None else take(attn.o_proj.bias),
        }
        if arch.qk_norm is not None:
            state |= {p + "attn.q_norm.w": norm(attn.q_norm), p + "attn.k_norm.w": norm(attn.k_norm)}
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: one projection, gate rows first
            gate, up = take(mlp.gate_up_proj.weight).chunk(2)
        else:
            gate, up = take(mlp.gate_proj.weight), take(mlp.up_proj.weight)
        state |= {
            p + "mlp.W_gate": gate.T,
            p + "mlp.W_in": up.T,
            p + "mlp.W_out": take(mlp.down_proj.weight).T,
            p + "mlp.b_in": zeros(cfg.d_mlp),
            p + "mlp.b_out": zeros(cfg.d_model),
        }
        state |= {p + "attn." + name: t for name, t in buffers[(at, types[i])].items()}
    at = devices[-1]
    state |= {"ln_final.w": norm(inner.norm)}
    unembed = take(hf_model.lm_head.weight).T
    shared = hf_model.lm_head.weight is inner.embed_tokens.weight and scale is None
    state |= {"unembed.W_U": unembed.clone() if shared else unembed, "unembed.b_U": zeros(cfg.d_vocab)}
    return state


def _qkv(attn, cfg: HookedTransformerConfig) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
    """The (q, k, v) weights and biases (None where absent) of an HF attention module: its three
    projections, or row slices (views) of Phi-3's fused qkv_proj."""
    if not hasattr(attn, "qkv_proj"):
        linears = (attn.q_proj, attn.k_proj, attn.v_proj)
        return tuple(l.weight for l in linears), tuple(l.bias for l in linears)
    kv = (cfg.n_key_value_heads or cfg.n_heads) * cfg.d_head
    sizes = [cfg.n_heads * cfg.d_head, kv, kv]
    bias = attn.qkv_proj.bias
    return attn.qkv_proj.weight.split(sizes), (None,) * 3 if bias is None else bias.split(sizes)


@torch.no_grad()
def _attention_buffers(
    hf_model, cfg: HookedTransformerConfig, device: torch.device, layer_type: str | None = None
) -> dict[str, Tensor]:
    """The buffers of attention layers: TransformerLens' empty causal-mask placeholder and
    masking value, and the checkpoint's own rotary tables for positions 0..n_ctx-1 (HF computes
    them in float32 from its rope config, scaling included, and casts them to the model's
    dtype; one pair shared by the layers on `device`, per layer type where the tables differ
    between sliding and full attention layers, as Gemma-3's do)."""
    probe = torch.zeros(1, cfg.n_ctx, 1, dtype=cfg.dtype, device=hf_model.device)
    positions = torch.arange(cfg.n_ctx, device=hf_model.device)[None]
    by_type = () if layer_type is None else (layer_type,)
    tables: tuple[Float[Tensor, "1 n_ctx rotary_dim"], ...] = decoder(hf_model).rotary_emb(probe, positions, *by_type)
    cos, sin = (t[0].to(device) for t in tables)
    if cos.shape[-1] != cfg.rotary_dim:
        raise SetupError(
            f"the checkpoint's rotary tables rotate {cos.shape[-1]} of each head's {cfg.d_head} dimensions, "
            f"expected {cfg.rotary_dim}"
        )
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
