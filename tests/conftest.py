"""Shared fixtures: tiny random LLaMA checkpoints saved in HF format, made on the fly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from et_circuits import models
from et_circuits.methods.evaluation import position_means
from et_circuits.tasks.entity_tracking import data
from tests import checkpoints

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str):
    """A script of benchmarks/ as a module, loaded once (registered, as its dataclasses need)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_checkpoint(path, n_layers=2, n_heads=4, n_kv_heads=None, d_model=32, seed=0):
    """A random LLaMA checkpoint as the `tiny` fixture's (HF's init, 512 positions), saved with
    the organism tokenizer (`checkpoints.make`); returns the HF model."""
    return checkpoints.make(path, "llama", n_heads, n_kv_heads, d_model, n_layers, seed, **checkpoints.TINY)


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


@pytest.fixture(scope="session")
def predicted(tiny_dir, vocab):
    """(model, prompts, means): a copy of the tiny model with its weights scaled 10x (sizeable
    head effects), 24 prompts whose answers are its own predictions (full accuracy = 1), and
    position means over 24 other prompts. Shared by the mean-ablation tests (evaluation,
    minimality, completeness); nothing may change the model."""
    model, tok, _ = models.load(tiny_dir, device="cpu")  # a copy: the weights are scaled below
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(10)
    batch = data.make_prompts(tok, data.sample_prompts(vocab, 24, 7, 11))
    with torch.no_grad():
        own = model(batch.input_ids)[torch.arange(len(batch)), batch.position("last")].argmax(-1)
    reference = data.make_prompts(tok, data.sample_prompts(vocab, 24, 7, 12))
    return model, batch.replace(answers=own), position_means(model, reference)
