"""The families beyond LLaMA (Qwen3, OLMo-2, Phi-3, Gemma-2, Gemma-3 text-only and image-text)
convert exactly: logits against HF for each feature (GQA, tied and untied embeddings, biases,
per-head and all-head q/k norms, post-norm and sandwich blocks, soft caps, partial and
per-layer-type rotary tables), hook points that hold the checkpoint's own activations, restarts
equal to the full forward, DCM and CMAP on a (base, LoRA) pair, bf16 without an fp32 copy, and
the limits refused in one line. LoRA merged vs unmerged and fast vs reference path patching run
over every family in test_loading.py."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from transformers import AutoModelForCausalLM

from et_circuits import models
from et_circuits.core.hooks import per_head_values
from et_circuits.core.restart import clean_run, run_suffix
from et_circuits.methods import cmap, dcm
from et_circuits.models.convert import decoder
from et_circuits.tasks.entity_tracking import data, desiderata
from et_circuits.tasks.entity_tracking.paper import paper_circuit
from tests import checkpoints
from tests.unit.models.support import one_line_error, write

FAMILIES = ["qwen3", "olmo2", "phi3", "gemma2", "gemma3_text", "gemma3"]
GEMMA3_ROPE = {  # as Gemma-3 4B: local layers at theta 1e4, global ones at 1e6 with linear scaling
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
}
PHI3_LONGROPE = {  # as Phi-3-mini-128k, on half of each head (as Phi-4-mini)
    "rope_type": "longrope",
    "short_factor": [1.0, 1.5],
    "long_factor": [2.0, 3.0],
    "original_max_position_embeddings": 32,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
}
# Phi-3 keeps original_max_position_embeddings at the top of its config too (and copies it in).
PHI3_LONGROPE_CONFIG = {"rope_parameters": PHI3_LONGROPE, "original_max_position_embeddings": 32}
CAPS = {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 2}
CASES = {  # id: (architecture, checkpoints.make arguments)
    "qwen3-gqa": ("qwen3", {"n_kv_heads": 2}),
    "qwen3-mha-tied-bias": ("qwen3", {"tie_word_embeddings": True, "attention_bias": True}),
    "olmo2-mha": ("olmo2", {}),
    "olmo2-gqa-bias": ("olmo2", {"n_kv_heads": 2, "attention_bias": True}),
    "olmo2-tied": ("olmo2", {"tie_word_embeddings": True}),
    "phi3-gqa": ("phi3", {"n_kv_heads": 2}),
    "phi3-partial-longrope": ("phi3", {"n_kv_heads": 2, **PHI3_LONGROPE_CONFIG}),
    "phi3-tied": ("phi3", {"tie_word_embeddings": True}),
    "gemma2-gqa-softcaps": ("gemma2", {"n_kv_heads": 2, **CAPS}),
    "gemma2-mha-untied": ("gemma2", {"tie_word_embeddings": False}),
    "gemma3-gqa-scaled-rope": (
        "gemma3_text",
        {
            "n_kv_heads": 2,
            "n_layers": 3,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": GEMMA3_ROPE,
            "final_logit_softcapping": 2.0,
        },
    ),
    "gemma3-mha-untied-bias": ("gemma3_text", {"tie_word_embeddings": False, "attention_bias": True}),
    "gemma3-image-text-gqa": ("gemma3", {"n_kv_heads": 2, "rope_parameters": GEMMA3_ROPE}),
    # the image-text model's forward applies no final soft cap, whatever its text config says
    "gemma3-image-text-untied-cap": ("gemma3", {"tie_word_embeddings": False, "final_logit_softcapping": 2.0}),
}


def _tokens(tok, n_prompts: int, n_tokens: int) -> torch.Tensor:
    """Random token ids (no special tokens), fixed by a seed."""
    return torch.randint(3, len(tok), (n_prompts, n_tokens), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(tmp_path, case):
    """fp32, every position the model is converted for (so every rotary table row)."""
    arch, kwargs = CASES[case]
    hf = checkpoints.make(tmp_path, arch, **kwargs)
    model, tok, _ = models.load(tmp_path, device="cpu")
    tokens = _tokens(tok, 2, model.cfg.n_ctx)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_what_each_case_exercises(tmp_path):
    """The cases above are not vacuous: Gemma's soft caps change the logits, Phi-3 rotates a
    quarter of each head by longrope tables up to 32 positions, Gemma-3's layer types have
    their own tables, and tied embeddings are tied in HF."""
    checkpoints.make(tmp_path / "caps", "gemma2", n_kv_heads=2, **CAPS)
    model, tok, _ = models.load(tmp_path / "caps", device="cpu")
    tokens = _tokens(tok, 2, 32)
    with torch.no_grad():
        capped = model(tokens)
        for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
            value = getattr(model.cfg, cap)
            setattr(model.cfg, cap, -1.0)
            assert (model(tokens) - capped).abs().max() > 1e-2, cap
            setattr(model.cfg, cap, value)
    checkpoints.make(tmp_path / "phi3", "phi3", **PHI3_LONGROPE_CONFIG)
    phi3, _, _ = models.load(tmp_path / "phi3", device="cpu")
    assert (phi3.cfg.rotary_dim, phi3.cfg.n_ctx) == (4, 32)
    checkpoints.make(tmp_path / "gemma3", "gemma3_text", layer_types=["sliding_attention", "full_attention"])
    gemma3, _, _ = models.load(tmp_path / "gemma3", device="cpu")
    local, full = (gemma3.blocks[i].attn.rotary_cos for i in (0, 1))
    assert not torch.allclose(local, full, atol=1e-3)
    hf = checkpoints.make(tmp_path / "tied", "qwen3", tie_word_embeddings=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf = checkpoints.make(tmp_path / "image-text", "gemma3", final_logit_softcapping=2.0)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration" and hf.config.text_config.final_logit_softcapping


@pytest.mark.parametrize("arch", FAMILIES)
def test_hook_points_hold_the_checkpoints_activations(tmp_path, arch):
    """hook_q / hook_k / hook_v are the checkpoint's q / k / v projections of each head (before
    any q/k norm and rotary; k and v per key/value head) and hook_z is the input of its o_proj,
    so they mean the same slot in every family."""
    hf = checkpoints.make(tmp_path, arch, n_kv_heads=2)
    model, tok, _ = models.load(tmp_path, device="cpu")
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(name, i):
        return lambda module, args, out: seen.__setitem__((name, i), out)

    for i, layer in enumerate(decoder(hf).layers):
        attn = layer.self_attn
        attn.o_proj.register_forward_pre_hook(lambda module, args, i=i: seen.__setitem__(("z", i), args[0]))
        if hasattr(attn, "qkv_proj"):
            attn.qkv_proj.register_forward_hook(keep("qkv", i))
        else:
            for name in "qkv":
                getattr(attn, f"{name}_proj").register_forward_hook(keep(name, i))
    tokens = _tokens(tok, 2, 24)
    with torch.no_grad():
        hf(tokens)
        _, cache = model.run_with_cache(tokens)
    d_q, d_kv = model.cfg.n_heads * model.cfg.d_head, model.cfg.n_key_value_heads * model.cfg.d_head
    for i in range(model.cfg.n_layers):
        if ("qkv", i) in seen:
            seen["q", i], seen["k", i], seen["v", i] = seen["qkv", i].split([d_q, d_kv, d_kv], dim=-1)
        for name in "zqkv":
            ours = cache[f"blocks.{i}.attn.hook_{name}"].flatten(-2)
            torch.testing.assert_close(ours, seen[name, i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", FAMILIES)
def test_restart_equals_the_full_forward(tmp_path, arch):
    """`run_suffix` from any (layer, position) gives the full forward's logits, with keys and
    values kept grouped or made per query head (as path patching does)."""
    checkpoints.make(tmp_path, arch, n_kv_heads=2, n_layers=3)
    model, tok, _ = models.load(tmp_path, device="cpu")
    tokens = _tokens(tok, 3, 20)
    for ungrouped in (False, True):
        with torch.no_grad(), per_head_values(model) if ungrouped else nullcontext():
            run = clean_run(model, tokens)
            assert (run.keys[0].shape[2] == model.cfg.n_heads) == ungrouped
            for layer, start in [(0, 0), (1, 7), (2, 19)]:
                torch.testing.assert_close(
                    run_suffix(model, run, layer, start), run.logits[:, start:], atol=1e-5, rtol=0
                )


# ---------------------------------------------------------------------------------------------
# DCM and CMAP on a (base, LoRA) pair of each family


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(base, LoRA-merged, tokenizer, vocabulary) of one family: 2 layers, 4 heads without GQA
    (so CMAP may patch keys and values), the adapter on every linear layer."""
    path = tmp_path_factory.mktemp(request.param)
    hf = checkpoints.make(path / "base", request.param, seed=2)
    checkpoints.make_adapter(hf, path / "lora")
    base, tok, _ = models.load(path / "base", device="cpu")
    merged, _ = models.load_hf(path / "base", adapter=path / "lora")
    return base, models.to_hooked(merged, tok), tok, data.vocabulary(tok)


def answer_logprob(logits, prompts):
    """The answer's mean log-probability: on random models, whose answer probabilities are all
    near 1 / vocabulary, it still tells patches apart."""
    return logits.log_softmax(-1)[torch.arange(len(prompts)), prompts.answers.to(logits.device)].mean()


def test_cmap_on_a_lora_pair_equals_patching_full_forwards(pair):
    """Every patch kind, through CMAP's restarted runs, equals the base model's full forward
    with the LoRA model's activations hooked in."""
    base, lora, tok, vocab = pair
    prompts = data.make_prompts(tok, data.sample_prompts(vocab, 12, 3, seed=1))
    heads = paper_circuit({"value_fetcher": [(1, 0), (1, 2)], "pos_detector": [(0, 3)], "struct_reader": [(0, 1)]})
    variants = [cmap.Variant(patch, patch, heads) for patch in cmap.PATCHES]
    result = cmap.cmap(base, lora, prompts, variants, metric=answer_logprob)
    assert abs(result.source - result.base) > 1e-2  # the adapter changes the model
    last = torch.arange(len(prompts)), prompts.position("last")
    for variant, value in result.variants:
        masks = cmap.site_masks(variant.heads, variant.patch, 2, 4)
        expected = answer_logprob(cmap.cross_model_logits(base, lora, prompts, masks)[last], prompts)
        assert value == pytest.approx(float(expected), abs=1e-4), variant.patch
    assert len({round(value, 4) for _, value in result.variants}) > 3  # the patches differ


def test_dcm_on_a_lora_pair(pair):
    """On both models: DCM's restarted masked forward equals the full one, and the protocol
    runs to a result."""
    _, _, tok, vocab = pair
    splits = desiderata.draw_splits(data.positional, vocab, (24, 8, 8), 7, seed=0)
    fit = desiderata.tokenize_pairs(tok, splits.train + splits.eval)
    heads = [(1, 0), (0, 2), (1, 3)]
    mask = torch.tensor([0.3, 0.9, 0.0])
    for model in pair[:2]:
        for position in ("last", "prev_query_label"):
            fast = dcm.prepare_pairs(model, fit, position, heads)
            full = dcm.prepare_pairs(model, fit, position, heads, run=False)
            assert fast.run is not None
            with torch.no_grad():
                torch.testing.assert_close(
                    dcm.masked_logits(model, heads, mask, fast),
                    dcm.masked_logits(model, heads, mask, full),
                    atol=1e-5,
                    rtol=0,
                )
    test = desiderata.tokenize_pairs(tok, splits.test)
    config = dcm.DCMConfig(batch_size=8, epochs=1)
    result = dcm.dcm(pair[1], heads, "last", fit, test, n_train=24, n_eval=8, seeds=(0,), config=config, resamples=2)
    assert set(result.selected) <= set(heads) and 0 <= result.mean <= 1


# ---------------------------------------------------------------------------------------------
# Lean loading, limits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_half_precision_load_holds_no_fp32_copy(tmp_path, arch, dtype):
    """Every weight in bf16 (fp16), the matrices views of HF's (Phi-3's fused ones included),
    and the logits HF's in that dtype up to its rounding (a conversion error is of order 1)."""
    checkpoints.make(tmp_path, arch, n_kv_heads=2)
    hf, tok = models.load_hf(tmp_path, dtype=dtype)
    model = models.to_hooked(hf, tok, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    layer, attn = decoder(hf).layers[0], model.blocks[0].attn
    fused = getattr(layer.self_attn, "qkv_proj", None)
    q_proj = fused if fused is not None else layer.self_attn.q_proj
    assert attn.W_Q.data_ptr() == q_proj.weight.data_ptr()
    assert attn.W_O.data_ptr() == layer.self_attn.o_proj.weight.data_ptr()
    assert model.blocks[0].mlp.W_out.data_ptr() == layer.mlp.down_proj.weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    tokens = _tokens(tok, 2, 32)
    with torch.no_grad():
        ours, theirs = model(tokens).float(), reference(tokens).logits.float()
    assert (ours - theirs).abs().max() < (0.25 if dtype == torch.bfloat16 else 0.05)


@pytest.mark.parametrize(
    "arch, config, differs",
    [
        ("mistral", {"sliding_window": 16}, 1e-2),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, 1e-3),
        ("phi3", {"sliding_window": 16}, 1e-3),
        ("gemma2", {"sliding_window": 16}, 1e-3),
        ("gemma3_text", {"sliding_window": 16}, 1e-3),
    ],
    ids=["mistral", "qwen3", "phi3", "gemma2", "gemma3"],
)
def test_sliding_window_is_refused_beyond_it(tmp_path, arch, config, differs):
    """Sliding-window layers are converted as global attention: exact within the window, and
    longer prompts refused in one line."""
    hf = checkpoints.make(tmp_path, arch, n_kv_heads=2, **config)
    model, tok, _ = models.load(tmp_path, device="cpu")
    assert model.cfg.window_size == 16
    models.check_fits(model, 16)
    one_line_error(lambda: models.check_fits(model, 17), "17 tokens", "sliding window", "(16 tokens)")
    with torch.no_grad():
        within, beyond = _tokens(tok, 2, 16), _tokens(tok, 2, 40)
        torch.testing.assert_close(model(within), hf(within).logits, atol=1e-4, rtol=0)
        assert (model(beyond) - hf(beyond).logits).abs().max() > differs  # why prompts must fit


def test_no_sliding_layer_no_window(tmp_path):
    """Qwen3 with use_sliding_window but every layer below max_window_layers slides nowhere."""
    checkpoints.make(tmp_path, "qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=2)
    model, _, _ = models.load(tmp_path, device="cpu")
    assert model.cfg.window_size is None


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model_type": "gemma3_text", "use_bidirectional_attention": True},
            "use_bidirectional_attention is not supported",
        ),
        ({"model_type": "olmo2", "hidden_act": "swish"}, "activation 'swish' is not supported"),
        (
            {"model_type": "gemma3_text", "rope_parameters": {**GEMMA3_ROPE, "full_attention": {"rope_type": "x"}}},
            "rope scaling 'x' is not supported",
        ),
        ({"model_type": "gemma"}, "(model_type='gemma'); supported model types: llama, mistral, qwen2, qwen3"),
    ],
    ids=["bidirectional", "activation", "rope-per-layer-type", "gemma-1"],
)
def test_unsupported_checkpoint_is_one_line(tmp_path, config, message):
    write(tmp_path / "config.json", json.dumps(config))
    one_line_error(lambda: models.load(tmp_path, device="cpu"), message)
