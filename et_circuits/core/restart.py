"""Restarting a forward pass from a clean prefix: the one home of "an intervention at layers
>= L and positions >= p changes nothing below L or before p".

A `CleanRun` keeps what an unpatched forward leaves for such restarts: per layer, the residual
stream entering it (`resid_pre`) and its keys and values (`hook_k` / `hook_v`, before any key
norm and rotary, in whatever head layout the model had when the run was made). `run_from` then computes only
layers >= L at positions >= p, attending to the clean keys and values of the earlier
positions. DCM, CMAP, knockout, mean ablation and fast path patching all restart this way
(`run_suffix` is the common case of one row per prompt).

`run_from` is this project's own pass over the blocks (it calls every TransformerLens module
and hook point on the way, so hooks see what they see in a normal forward): its batch may hold
each prompt many times (fast path patching: one row per sender and prompt), and the clean
prefix is normalised, rotated and projected once per prompt and broadcast over those rows, where
TransformerLens' KV cache would tile it per row and rotate all of it again in every layer. The
result equals TransformerLens' full forward up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from .errors import SetupError
from .hooks import Hook, keep_hooks

SUPPORTED_POSITIONAL = ("rotary", "standard")


# Configuration flags `run_from` does not reproduce (each changes the attention or the block).
UNSUPPORTED_FLAGS = (
    "use_attn_in",
    "use_split_qkv_input",
    "use_dynamic_ntk_rope",
    "use_logn_attn",
    "use_attention_sinks",
)
# Where TransformerLens normalises queries and keys over all heads together, after hook_q / hook_k
# (`AbstractAttention.forward`); `use_qk_norm` normalises each head's, inside
# `calculate_qkv_matrices`.
ALL_HEADS_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def check_supported(model: HookedTransformer) -> None:
    """SetupError (one line) for model configurations whose activations a restart cannot
    reproduce exactly: positional schemes other than rotary or learned absolute embeddings,
    local (sliding-window) attention, and the block variants in `UNSUPPORTED_FLAGS`. Per-head
    and all-head q/k norms, sandwich and post-norm blocks, soft caps and any attention scale
    are reproduced: each acts on one position at a time."""
    cfg = model.cfg
    if cfg.positional_embedding_type not in SUPPORTED_POSITIONAL:
        raise SetupError(
            f"positional embeddings {cfg.positional_embedding_type!r} are not supported; "
            f"supported: {', '.join(SUPPORTED_POSITIONAL)}"
        )
    if cfg.attn_types is not None and "local" in cfg.attn_types:
        raise SetupError("models with local (sliding-window) attention layers are not supported")
    flags = [f for f in UNSUPPORTED_FLAGS if getattr(cfg, f, False)]
    if flags or cfg.attention_dir != "causal" or getattr(cfg, "clip_qkv", None) is not None:
        raise SetupError(f"this model's attention is not supported ({', '.join(flags) or 'non-causal or clipped'})")


def block_device(model: HookedTransformer, layer: int) -> torch.device:
    """Where block `layer`'s weights are (all on one device unless the model is split over
    GPUs): where its activations are made and where what it reads must be."""
    return model.blocks[layer].attn.W_Q.device


def output_device(model: HookedTransformer) -> torch.device:
    """Where the final norm and the unembedding are: where logits are made."""
    return model.unembed.W_U.device


def on_layers(
    model: HookedTransformer | None, by_layer: Mapping[int, Tensor], index: Int[Tensor, " n"] | slice = slice(None)
) -> dict[int, Tensor]:
    """`by_layer[l][index]` for every layer l, on layer l's device (where they are: no model)."""
    if model is None:
        return {l: t[index] for l, t in by_layer.items()}
    return {l: t[index].to(block_device(model, l)) for l, t in by_layer.items()}


@dataclass
class CleanRun:
    """An unpatched forward kept for restarts: `resid[l]` ([batch, seq, d_model], the input of
    layer l), `keys[l]` / `values[l]` ([batch, positions, kv_heads, d_head]; possibly only a
    prefix of the positions) and, optionally, the logits. Layers may be a subset (`restrict`)."""

    resid: dict[int, Float[Tensor, "batch seq d_model"]] = field(default_factory=dict)
    keys: dict[int, Float[Tensor, "batch pos kv_head d_head"]] = field(default_factory=dict)
    values: dict[int, Float[Tensor, "batch pos kv_head d_head"]] = field(default_factory=dict)
    logits: Float[Tensor, "batch seq vocab"] | None = None

    def __len__(self) -> int:
        return next(iter(self.resid.values())).shape[0]

    def take(self, index: Int[Tensor, " n"] | slice, model: HookedTransformer | None = None) -> CleanRun:
        """The rows of some prompts: where they are, or on the devices of `model`'s layers
        (each layer's tensors on its block's device, the logits on the unembedding's)."""
        logits = None if self.logits is None else self.logits[index]
        if logits is not None and model is not None:
            logits = logits.to(output_device(model))
        return CleanRun(*(on_layers(model, getattr(self, name), index) for name in ("resid", "keys", "values")), logits)

    def restrict(self, layer: int, start: int) -> CleanRun:
        """Only what `run_suffix(model, run, layer, start)` reads: the residual entering `layer`
        and the keys / values of positions < `start` in layers >= `layer` (the memory a
        restart at that point needs)."""
        later = [l for l in self.keys if l >= layer]
        return CleanRun(
            {layer: self.resid[layer]},
            {l: self.keys[l][:, :start] for l in later},
            {l: self.values[l][:, :start] for l in later},
        )

    @staticmethod
    def concat(runs: Sequence[CleanRun]) -> CleanRun:
        """Chunks of one clean run, joined along the batch."""

        def cat(name: str) -> dict[int, Tensor]:
            return {l: torch.cat([getattr(r, name)[l] for r in runs]) for l in getattr(runs[0], name)}

        logits = None if runs[0].logits is None else torch.cat([r.logits for r in runs])
        return CleanRun(cat("resid"), cat("keys"), cat("values"), logits)


@torch.no_grad()
def clean_run(
    model: HookedTransformer, input_ids: Int[Tensor, "batch seq"], fwd_hooks: Sequence[Hook] = ()
) -> CleanRun:
    """Run `model` once (with optional extra hooks that only read) and keep what `run_suffix`
    restarts from, plus the logits."""
    run = CleanRun()
    layers = range(model.cfg.n_layers)
    hooks = [
        *fwd_hooks,
        *keep_hooks("resid_pre", layers, run.resid),
        *keep_hooks("k", layers, run.keys),
        *keep_hooks("v", layers, run.values),
    ]
    run.logits = model.run_with_hooks(input_ids.to(model.cfg.device), fwd_hooks=hooks)
    return run


def run_suffix(
    model: HookedTransformer,
    run: CleanRun,
    layer: int,
    start: int,
    fwd_hooks: Sequence[Hook] = (),
    grad: bool = False,
    read_at: Int[Tensor, " batch"] | None = None,
) -> Tensor:
    """Logits of positions `start`.. of an intervention (`fwd_hooks`) that touches only layers
    >= `layer` and positions >= `start`: the suffix restarts from its clean residual at `layer`,
    attending to the clean keys / values of positions < `start`. With `read_at` (one suffix
    position per prompt) only the logits there ([batch, vocab]).

    Hooks see suffix coordinates on the query axis (position p is p - start); key axes of
    attention scores keep full positions. `grad`: keep the autograd graph (DCM's masks)."""
    keys = {l: k[:, :start] for l, k in run.keys.items() if l >= layer}
    values = {l: v[:, :start] for l, v in run.values.items() if l >= layer}
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return run_from(model, run.resid[layer][:, start:], layer, keys, values, fwd_hooks, read_at=read_at)


def run_from(
    model: HookedTransformer,
    x: Float[Tensor, "rows suffix d_model"],
    layer: int,
    keys: Mapping[int, Float[Tensor, "prompts start kv_head d_head"]],
    values: Mapping[int, Float[Tensor, "prompts start kv_head d_head"]],
    fwd_hooks: Sequence[Hook] = (),
    stop_at_layer: int | None = None,
    read_at: Int[Tensor, " rows"] | None = None,
    joining: Mapping[int, Float[Tensor, "rows suffix d_model"]] | None = None,
) -> Tensor:
    """Run layers `layer`.. (up to `stop_at_layer`, exclusive: then the residual stream is
    returned) on `x`, the residual entering `layer` at positions start.. of some prompts, where
    `keys[l]` / `values[l]` are the clean keys and values of positions < start of each prompt.
    `x` may hold each prompt several times, rows repeat-major (row r * prompts + i is prompt i):
    the prefix is shared by all of them. Returns logits at the suffix positions, or with
    `read_at` (one suffix position per row) only there ([rows, vocab]): the final norm and the
    unembedding run on those positions alone.

    `joining[m]`: more rows of the same layout that enter at layer m (appended after the rows
    already running, before block m), so that interventions starting at different
    layers share one pass, each row computing only the layers from its own."""
    check_supported(model)
    stop = model.cfg.n_layers if stop_at_layer is None else stop_at_layer
    joining = joining or {}
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for i in range(layer, stop):
            on = block_device(model, i)  # a model split over GPUs: the residual follows its layers
            x = x.to(on)
            if i in joining:
                x = torch.cat([x, joining[i].to(on, x.dtype)])
            x = _block(model.blocks[i], x, keys[i].to(on), values[i].to(on))
        if stop_at_layer is not None:
            return x
        x = x.to(output_device(model))
        if read_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), read_at.to(x.device)]
        if model.cfg.normalization_type is not None:
            x = model.ln_final(x)
        return apply_softcap(model.unembed(x), model.cfg.output_logits_soft_cap)


def _block(block, resid_pre: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """One TransformerLens block (as `TransformerBlock.forward`: pre-norm, with Gemma's norms
    after each sublayer too, or OLMo-2's post-norm) on a suffix that attends to a shared clean
    prefix."""
    cfg = block.cfg
    post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES  # ln1 / ln2 normalise each sublayer's output
    resid_pre = block.hook_resid_pre(resid_pre)
    attn_out = _attention(block.attn, resid_pre if post_norm else block.ln1(resid_pre), keys, values)
    if cfg.use_normalization_before_and_after:
        attn_out = block.ln1_post(attn_out)
    if post_norm:
        attn_out = block.ln1(attn_out)
    attn_out = block.hook_attn_out(attn_out)
    if cfg.attn_only:
        return block.hook_resid_post(resid_pre + attn_out)
    if cfg.parallel_attn_mlp:
        mlp_in = resid_pre if not cfg.use_hook_mlp_in else block.hook_mlp_in(resid_pre.clone())
        return block.hook_resid_post(resid_pre + attn_out + block.apply_mlp(block.ln2(mlp_in)))
    resid_mid = block.hook_resid_mid(resid_pre + attn_out)
    mlp_in = resid_mid if not cfg.use_hook_mlp_in else block.hook_mlp_in(resid_mid.clone())
    # apply_mlp adds the norm after the MLP (ln2_post; OLMo-2's ln2)
    return block.hook_resid_post(resid_mid + block.apply_mlp(mlp_in if post_norm else block.ln2(mlp_in)))


def _all_heads_norm(t: Float[Tensor, "... head d_head"], norm) -> Float[Tensor, "... head d_head"]:
    """OLMo's q/k RMSNorm over the heads of a position together, as TransformerLens applies it."""
    return norm(t.flatten(-2)).unflatten(-1, t.shape[-2:])


def _normed_keys(attn, keys: Float[Tensor, "batch pos kv_head d_head"]) -> Float[Tensor, "batch pos kv_head d_head"]:
    """Keys as hook_k holds them, normalised as the attention then does (per head with
    `use_qk_norm`, over all heads for OLMo; unchanged without a k norm)."""
    if attn.cfg.use_qk_norm:
        return attn._apply_qk_norm(keys, attn.k_norm)
    if attn.cfg.original_architecture in ALL_HEADS_QK_NORM:
        return _all_heads_norm(keys, attn.k_norm)
    return keys


def _per_head(t: Tensor, n_heads: int) -> Tensor:
    """Keys or values with one head per query head (grouped-query kv heads repeated)."""
    return t if t.shape[2] == n_heads else t.repeat_interleave(n_heads // t.shape[2], dim=2)


def _attention(attn, normed: Tensor, prefix_keys: Tensor, prefix_values: Tensor) -> Tensor:
    """Attention of the suffix rows (queries at positions start..) over the shared prefix and
    the suffix itself, with TransformerLens' hook points and arithmetic (q/k norms, scale, soft
    cap, causal mask with its IGNORE value, NaN-free softmax, W_O). The prefix keys are kept as
    hook_k saw them, so they are normalised and rotated here as in the forward that made them."""
    cfg = attn.cfg
    n_heads, start = cfg.n_heads, prefix_keys.shape[1]
    q, k, v = attn.calculate_qkv_matrices(normed, normed, normed)  # hook_q / hook_k / hook_v, per-head q/k norm
    if cfg.original_architecture in ALL_HEADS_QK_NORM:
        q, k = _all_heads_norm(q, attn.q_norm), _all_heads_norm(k, attn.k_norm)
    prefix_keys = _normed_keys(attn, prefix_keys)
    if cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, start))
        k = attn.hook_rot_k(attn.apply_rotary(k, start))
        prefix_keys = attn.apply_rotary(prefix_keys, 0)
    rows, length = q.shape[:2]
    prompts = prefix_keys.shape[0]
    q = q.transpose(1, 2)  # rows head suffix d
    k, v = (_per_head(t, n_heads).transpose(1, 2) for t in (k, v))
    pk, pv = (_per_head(t.to(q.dtype), n_heads).transpose(1, 2) for t in (prefix_keys, prefix_values))
    shared = q.reshape(rows // prompts, prompts, n_heads, length, -1)
    scores = (
        torch.cat(
            [(shared @ pk.transpose(-1, -2)[None]).reshape(rows, n_heads, length, start), q @ k.transpose(-1, -2)],
            dim=-1,
        )
        / attn.attn_scale
    )
    scores = apply_softcap(scores, cfg.attn_scores_soft_cap)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    visible = torch.cat([torch.ones(length, start, dtype=torch.bool, device=q.device), causal], dim=-1)
    scores = attn.hook_attn_scores(torch.where(visible, scores, attn.IGNORE.to(scores.device)))
    pattern = torch.softmax(scores, dim=-1)
    pattern = attn.hook_pattern(torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)).to(v.dtype)
    # The two halves of pattern @ values add up in float32 and round once, as one matmul would.
    wide = torch.promote_types(v.dtype, torch.float32)
    to_prefix = pattern[..., :start].reshape(rows // prompts, prompts, n_heads, length, start)
    z = (to_prefix.to(wide) @ pv.to(wide)[None]).reshape(rows, n_heads, length, -1)
    z = (z + pattern[..., start:].to(wide) @ v.to(wide)).to(v.dtype)
    z = attn.hook_z(z.transpose(1, 2))  # rows suffix head d
    if cfg.use_attn_result:
        result = attn.hook_result(torch.einsum("bphd,hdm->bphm", z, attn.W_O))
        return result.sum(-2) + attn.b_O
    return (
        z.reshape(rows, length, n_heads * cfg.d_head) @ attn.W_O.reshape(n_heads * cfg.d_head, cfg.d_model) + attn.b_O
    )


def embed(
    model: HookedTransformer, input_ids: Int[Tensor, "batch suffix"], start: int
) -> Float[Tensor, "batch suffix d_model"]:
    """The residual stream entering layer 0 for tokens placed at positions `start`.. (token
    embeddings, plus learned positional embeddings where the model has them)."""
    check_supported(model)
    x = model.embed(input_ids.to(model.embed.W_E.device))
    if model.cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed(input_ids, start)
    return x


def restart_bytes(model: HookedTransformer, n: int, seq: int, layer: int, start: int) -> int:
    """Memory of `CleanRun.restrict(layer, start)` for n prompts of length seq."""
    cfg = model.cfg
    kv_heads = cfg.n_key_value_heads or cfg.n_heads
    per_prompt = seq * cfg.d_model + 2 * start * (cfg.n_layers - layer) * kv_heads * cfg.d_head
    return n * per_prompt * torch.finfo(cfg.dtype).bits // 8


@torch.no_grad()
def restarts(
    model: HookedTransformer,
    input_ids: Int[Tensor, "n seq"],
    points: Sequence[tuple[int, int]],
    batch_size: int = 32,
) -> list[CleanRun]:
    """`clean_run(...).restrict(layer, start)` for every (layer, start) in `points`, from one
    clean run per chunk of `batch_size` prompts."""
    parts: list[list[CleanRun]] = [[] for _ in points]
    for chunk in input_ids.split(batch_size):
        run = clean_run(model, chunk)
        for i, (layer, start) in enumerate(points):
            parts[i].append(run.restrict(layer, start))
    return [CleanRun.concat(p) for p in parts]


# ---------------------------------------------------------------------------------------------
# Batching restarts: rows that repeat prompts, grouped by where their suffix starts


def tile(t: Tensor, reps: int) -> Tensor:
    """`reps` copies of `t` along the batch, repeat-major (the row layout of `run_from`)."""
    return t.repeat(reps, *([1] * (t.ndim - 1)))


def earliest(at: Int[Tensor, "batch k"]) -> Int[Tensor, " batch"]:
    """Each prompt's first position of a set (a prompt without any: its length would do; 0)."""
    big = torch.iinfo(at.dtype).max
    first = torch.where(at >= 0, at, torch.full_like(at, big)).min(1).values
    return torch.where(first == big, torch.zeros_like(first), first)


def same_start_chunks(start: Int[Tensor, " batch"], size: int) -> list[Int[Tensor, " n"]]:
    """Prompt indices in chunks of at most `size` that share a start position, so a chunk's
    suffix run (a receiver run, a corrupt run) starts right there."""
    chunks = []
    for value in torch.unique(start).tolist():
        chunks += list((start == value).nonzero()[:, 0].split(size))
    return chunks
