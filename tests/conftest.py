"""Shared fixtures: tiny random LLaMA checkpoints saved in HF format, made on the fly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from et_circuits import models
from et_circuits.tasks.entity_tracking import data
from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer


def make_checkpoint(path, n_layers=2, n_heads=4, n_kv_heads=None, d_model=32, seed=0):
    """Save a random LlamaForCausalLM and the organism tokenizer to `path`; return the HF model."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer, 4-head random LLaMA checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(HookedTransformer, tokenizer) of the tiny checkpoint, fp32 on CPU."""
    model, tok, _ = models.load(tiny_dir, device="cpu")
    return model, tok


@pytest.fixture(scope="session")
def vocab(tiny):
    return data.vocabulary(tiny[1])


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster and immune to other processes' load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
