"""The organism's model and its training step: the LLaMA geometry (`Arch`, `new_model`,
`save_model`), AdamW with its schedule (`Opt`, `optimizer`), one step on the answer loss, and
the accuracies that monitor training. The base search and the fine-tunes share all of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from et_circuits.core.hooks import logits_at
from et_circuits.core.metrics import n_correct
from et_circuits.core.prompts import LAST, PromptSet

from .corpus import IGNORE, Example, collate

# ---------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class Arch:
    """LLaMA geometry of the organism (untied embeddings, RMSNorm, rotary, SwiGLU)."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 64
    d_mlp: int = 192
    max_positions: int = 512
    rope_theta: float = 100.0
    init_std: float = 0.02


def new_model(arch: Arch, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.d_model,
        intermediate_size=arch.d_mlp,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_heads,
        head_dim=arch.d_model // arch.n_heads,
        max_position_embeddings=arch.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        rms_norm_eps=1e-5,
        initializer_range=arch.init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).float()


def save_model(model, tokenizer, path: Path) -> None:
    """HF format (config.json, model.safetensors) and tokenizer.json; for a PeftModel the
    adapter (adapter_config.json, adapter_model.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "README.md").unlink(missing_ok=True)  # peft's blank card; the family's is one level up


# ---------------------------------------------------------------------------------------------
# Optimisation


@dataclass(frozen=True)
class Opt:
    lr: float
    warmup: int = 200
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    clip: float = 1.0
    batch: int = 64


def optimizer(params, opt: Opt, total: int | None = None):
    """AdamW with linear warm-up, then constant (total=None) or cosine decay to 10%."""
    params = [p for p in params if p.requires_grad]
    adam = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)

    def factor(step: int) -> float:
        if step < opt.warmup:
            return (step + 1) / opt.warmup
        if total is None:
            return 1.0
        frac = min(1.0, (step - opt.warmup) / max(1, total - opt.warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))

    return adam, torch.optim.lr_scheduler.LambdaLR(adam, factor), params


def answer_loss(model, ids: Int[Tensor, "b s"], targets: Int[Tensor, "b s"]) -> Tensor:
    """Cross-entropy on the answer positions only (causal: right padding needs no mask)."""
    logits: Float[Tensor, "b s v"] = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def train_step(model, adam, sched, params, examples: Sequence[Example], pad: int, clip: float) -> float:
    """One AdamW step on the answer loss of `examples`."""
    loss = answer_loss(model, *collate(examples, pad))
    adam.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    adam.step()
    sched.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Accuracies


@torch.no_grad()
def prompt_accuracy(model, prompts: PromptSet, chunk: int = 300) -> float:
    """Argmax at the last token == answer, with the HF model."""
    was_training = model.training
    model.eval()
    hits = sum(
        n_correct(logits_at(model(input_ids=c.input_ids).logits, c.position(LAST)), c.answers)
        for c in prompts.chunks(chunk)
    )
    model.train(was_training)
    return hits / len(prompts)


@torch.no_grad()
def example_accuracy(model, examples: Sequence[Example], pad: int) -> float:
    """Fraction of scored positions whose argmax is the target (a fine-tuning task's accuracy)."""
    was_training = model.training
    model.eval()
    ids, targets = collate(examples, pad)
    pred = model(input_ids=ids).logits.argmax(-1)
    model.train(was_training)
    mask = targets != IGNORE
    return (pred[mask] == targets[mask]).float().mean().item()
