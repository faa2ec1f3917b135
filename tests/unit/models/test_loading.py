"""The loader: every architecture and rope scaling converts exactly (logits, LoRA merge, path
patching), the conversion copies no weights, and the limits of exactness are refused in one line."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from et_circuits import models
from et_circuits.core.settings import RunSettings
from et_circuits.methods import discovery
from et_circuits.methods import path_patching as pp
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from tests import checkpoints
from tests.conftest import make_checkpoint
from tests.unit.models.support import one_line_error, write

THETA = {"rope_theta": 10000.0}
ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0, **THETA},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, **THETA},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
        **THETA,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, **THETA},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [2.0, 3.0, 4.0, 5.0],
        "original_max_position_embeddings": 32,
        **THETA,
    },
}
CASES = {  # id: (architecture, checkpoints.make arguments)
    "llama-mha": ("llama", {}),
    "llama-gqa": ("llama", {"n_kv_heads": 2}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    **{f"llama-{kind}": ("llama", {"n_kv_heads": 2, "rope_parameters": rope}) for kind, rope in ROPE.items()},
    "mistral-gqa": ("mistral", {"n_kv_heads": 2}),
    "mistral-mha-window": ("mistral", {"sliding_window": checkpoints.N_POSITIONS}),
    "qwen2-gqa": ("qwen2", {"n_kv_heads": 2}),
    "qwen2-mha-tied": ("qwen2", {"tie_word_embeddings": True}),
}
ARCHS = list(checkpoints.CLASSES)


def _tokens(tok, n_prompts: int, n_tokens: int) -> torch.Tensor:
    """Random token ids (no special tokens), fixed by a seed."""
    return torch.randint(3, len(tok), (n_prompts, n_tokens), generator=torch.Generator().manual_seed(0))


def _prompts(tok, n=4, seed=0):
    return data.make_prompts(tok, data.sample_prompts(data.vocabulary(tok), n, 7, seed))


def _path_patching(model, clean, corrupt, group: str, receivers, method: str) -> torch.Tensor:
    """One step's path-patching scores: this file's only call into the path-patching API."""
    step = next(s for s in PAPER_STEPS if s.group == group)
    result = pp.path_patch(
        model,
        clean,
        corrupt,
        step.position,
        receivers=discovery.step_receivers(step, receivers) or None,
        method=method,
        settings=RunSettings(8, progress=False),
    )
    return result.scores


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(tmp_path, case):
    """fp32, every position the model is converted for (so every rotary table row)."""
    arch, kwargs = CASES[case]
    hf = checkpoints.make(tmp_path, arch, **kwargs)
    model, tok, _ = models.load(tmp_path, device="cpu")
    n_ctx = model.cfg.n_ctx
    assert model.blocks[0].attn.rotary_cos.shape[0] == n_ctx
    tokens = _tokens(tok, 2, n_ctx)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["default", *ROPE])
def test_rope_tables_are_the_checkpoints(tmp_path, kind):
    """Scaled tables differ from plain RoPE (so the logits test exercises the scaling); dynamic
    NTK equals plain RoPE up to max_position_embeddings; n_ctx ends where tables would change."""
    rope = ROPE.get(kind, {"rope_type": "default", **THETA})
    checkpoints.make(tmp_path, rope_parameters=rope)
    model, _, _ = models.load(tmp_path, device="cpu")
    attn, n_ctx = model.blocks[0].attn, model.cfg.n_ctx
    assert n_ctx == (32 if kind == "longrope" else checkpoints.N_POSITIONS)
    _, plain_cos = attn.calculate_sin_cos_rotary(model.cfg.rotary_dim, n_ctx, base=10000.0)
    assert torch.allclose(attn.rotary_cos, plain_cos, atol=1e-5) == (kind in ("default", "dynamic"))


def test_dynamic_rope_is_refused_beyond_max_positions(tmp_path):
    hf = checkpoints.make(tmp_path, rope_parameters=ROPE["dynamic"])
    model, tok, _ = models.load(tmp_path, device="cpu")
    n = checkpoints.N_POSITIONS
    models.check_fits(model, n)
    tokens = _tokens(tok, 1, n + 1)
    with torch.no_grad():  # HF rescales every position's table once the prompt is longer
        within = hf(tokens[:, :n]).logits  # first: HF keeps a grown table for a prompt of n
        assert not torch.allclose(hf(tokens).logits[:, :n], within, atol=1e-3)
    one_line_error(lambda: models.check_fits(model, n + 1), f"{n + 1} tokens", f"n_ctx of {tmp_path.name} ({n})")


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapter_merged_at_load_equals_peft(tmp_path, arch):
    """Through a registry file (base + adapter), against the unmerged PeftModel."""
    from peft import PeftModel

    hf = checkpoints.make(tmp_path / "base", arch, n_kv_heads=2)
    checkpoints.make_adapter(hf, tmp_path / "lora")
    registry = write(
        tmp_path / "models.toml", '[models.base]\npath = "base"\n[models.ft]\nbase = "base"\nadapter = "lora"\n'
    )
    models.use_registry(registry)
    merged, tok, spec = models.load("ft", device="cpu")
    plain, _, _ = models.load("base", device="cpu")
    assert spec.is_adapter and not any("lora" in n for n, _ in merged.named_parameters())
    peft_model = PeftModel.from_pretrained(type(hf).from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    tokens = _tokens(tok, 2, 64)
    with torch.no_grad():
        ours, theirs = merged(tokens), peft_model(tokens).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        assert (ours - plain(tokens)).abs().max() > 1e-2, "the adapter must change the logits"


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_patching_equals_reference(tmp_path, arch):
    checkpoints.make(tmp_path, arch, n_kv_heads=2, seed=1)
    model, _, _ = models.load(tmp_path, device="cpu")
    tok = build_tokenizer()  # the checkpoint's own: transformers reads it as Qwen2's for qwen2
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 12, 7, seed=3)
    fast = _path_patching(model, clean, corrupt, "struct_reader", [(1, 1)], "fast")
    ref = _path_patching(model, clean, corrupt, "struct_reader", [(1, 1)], "reference")
    assert ref.abs().max() > 1e-4  # not a comparison of zeros
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_hooked_logits_match_hf_on_prompts(tmp_path):
    hf = make_checkpoint(tmp_path, n_layers=2, n_heads=4, n_kv_heads=2)
    model, tok, _ = models.load(tmp_path, device="cpu")
    assert model.cfg.n_key_value_heads == 2
    batch = _prompts(tok)
    with torch.no_grad():
        torch.testing.assert_close(model(batch.input_ids), hf(batch.input_ids).logits, atol=1e-4, rtol=0)


def test_config_comes_from_checkpoint(tmp_path):
    make_checkpoint(tmp_path, n_layers=3, n_heads=2, d_model=16)
    model, _, _ = models.load(tmp_path, device="cpu")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head) == (3, 2, 16, 8)
    assert model.cfg.d_mlp == 32 and model.cfg.rotary_base == 10000.0
    assert model.cfg.original_architecture == "LlamaForCausalLM" and model.cfg.window_size is None


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "gpt2"}, "(model_type='gpt2'); supported model types: llama, mistral, qwen2"),
        (
            {"model_type": "llama", "rope_parameters": {"rope_type": "proportional", **THETA}},
            "rope scaling 'proportional' is not supported; supported: default, linear, dynamic, llama3, yarn, longrope",
        ),
        ({"model_type": "llama", "mlp_bias": True}, "mlp_bias is not supported"),
    ],
    ids=["model-type", "rope-type", "mlp-bias"],
)
def test_unsupported_checkpoint_is_one_line(tmp_path, config, message):
    write(tmp_path / "config.json", json.dumps(config))
    one_line_error(lambda: models.load(tmp_path, device="cpu"), message)


# ---------------------------------------------------------------------------------------------
# lean loading


def test_weights_are_views_of_the_hf_tensors(tmp_path):
    """No copy: TransformerLens' weights are the HF tensors re-viewed, except a tied
    unembedding, which gets its own storage so that W_E and W_U stay independent."""
    checkpoints.make(tmp_path, "qwen2", n_kv_heads=2, tie_word_embeddings=True)
    hf, tok = models.load_hf(tmp_path)
    model = models.to_hooked(hf, tok)
    attn, mlp, layer = model.blocks[0].attn, model.blocks[0].mlp, hf.model.layers[0]
    assert attn.W_Q.data_ptr() == layer.self_attn.q_proj.weight.data_ptr()
    assert attn._W_K.data_ptr() == layer.self_attn.k_proj.weight.data_ptr()
    assert attn.b_Q.data_ptr() == layer.self_attn.q_proj.bias.data_ptr()
    assert mlp.W_out.data_ptr() == layer.mlp.down_proj.weight.data_ptr()
    assert model.embed.W_E.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert model.unembed.W_U.data_ptr() != model.embed.W_E.data_ptr()


def test_in_place_edits_leave_the_checkpoint_unchanged(tmp_path):
    """The weights are memory-mapped copy-on-write: scaling them in place (as tests and
    experiments do) changes neither the file nor a later load."""
    hf = checkpoints.make(tmp_path)
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    model, tok, _ = models.load(tmp_path, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    again, _, _ = models.load(tmp_path, device="cpu")
    assert hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest() == digest
    tokens = _tokens(tok, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_bfloat16_load_matches_hf_bfloat16(tmp_path):
    checkpoints.make(tmp_path, "llama", n_kv_heads=2)
    model, tok, _ = models.load(tmp_path, device="cpu", dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = _tokens(tok, 2, 32)
    with torch.no_grad():  # bf16 rounding only (a conversion error is of order 1)
        torch.testing.assert_close(model(tokens).float(), hf(tokens).logits.float(), atol=0.125, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_built_on_the_gpu(tmp_path):
    hf = checkpoints.make(tmp_path, "qwen2", n_kv_heads=2)
    model, tok, _ = models.load(tmp_path, device="cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    tokens = _tokens(tok, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens.cuda()).cpu(), hf(tokens).logits, atol=1e-4, rtol=0)
