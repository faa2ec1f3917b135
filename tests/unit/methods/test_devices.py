"""Models split over devices, tested without GPUs.

A 4-layer model whose first two blocks (and embedding) sit on the CPU and whose last two (and
unembedding) sit on the meta device, with fake tensors (torch's FakeTensorMode) as weights.
Fake tensors compute shapes and devices but no values, and refuse every operation that mixes
two devices, as CUDA does. So each method that runs through the split model reads every cache,
prefix and hook value on its layer's device, and hands its metric logits from the last one.
The values themselves are tested on one device everywhere else; the split over real GPUs
(`n_devices`) follows the same layout (`models.block_devices`) and is only measured on a GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformer_lens import HookedTransformerConfig

import et_circuits as et
from et_circuits import models
from et_circuits.core.distributed import local_device
from et_circuits.core.errors import SetupError
from et_circuits.core.restart import block_device, clean_run, run_suffix
from et_circuits.methods import dcm
from et_circuits.methods.cmap import cross_model_logits, site_masks
from et_circuits.methods.dcm.masking import frozen
from et_circuits.methods.evaluation import ablated_last_logits, position_means
from et_circuits.models import convert
from et_circuits.tasks.entity_tracking import data, desiderata, recipe
from tests.conftest import make_checkpoint

CPU, META = torch.device("cpu"), torch.device("meta")
S = et.RunSettings(batch_size=4, progress=False)


WHOLLY_ON_META: list[HookedTransformerConfig] = []  # the configs of models with every layer on meta


def _layout(index, cfg, device=None):
    """The test's layout: the lower half of the blocks on the CPU, the upper half on meta (all
    of them for a model in WHOLLY_ON_META)."""
    on_meta = any(cfg is c for c in WHOLLY_ON_META) or index >= cfg.n_layers // 2
    return META if on_meta else CPU


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(fake split model, fake model wholly on meta, tokenizer, vocabulary)."""
    path = tmp_path_factory.mktemp("split")
    make_checkpoint(path, n_layers=4, n_heads=4, n_kv_heads=2, seed=1)
    hf, tok = models.load_hf(path)
    with pytest.MonkeyPatch.context() as patch, FakeTensorMode(allow_non_fake_inputs=True):
        patch.setattr(convert, "get_device_for_block_index", lambda index, cfg, device=None: META)
        other = models.to_hooked(hf, tok, "cpu")
        WHOLLY_ON_META.append(other.cfg)
        patch.setattr(convert, "get_device_for_block_index", _layout)
        model = models.to_hooked(hf, tok, "cpu")
    return model, other, tok, data.vocabulary(tok, min_labels=8)


@pytest.fixture
def split(built, monkeypatch):
    """`built`, with TransformerLens' forward moving the residual stream by the same layout as
    the weights were placed by."""
    monkeypatch.setattr(sys.modules["transformer_lens.HookedTransformer"], "get_device_for_block_index", _layout)
    return built


def _on_last_device(logits, prompts):
    """A metric that checks where its logits are (fake logits have no value to score)."""
    assert logits.device == META, logits.device
    return 0.5


def test_layers_and_their_caches_sit_on_their_devices(split):
    model, _, tok, vocab = split
    assert [block_device(model, i) for i in range(4)] == [CPU, CPU, META, META]
    assert model.embed.W_E.device == CPU and model.unembed.W_U.device == META and model.ln_final.w.device == META
    assert model.blocks[3].attn.rotary_cos.device == META and model.blocks[0].attn.rotary_cos.device == CPU
    prompts = data.make_prompts(tok, data.sample_prompts(vocab, 4, 3, seed=0))
    run = clean_run(model, prompts.input_ids)
    assert [run.keys[i].device for i in range(4)] == [CPU, CPU, META, META] and run.logits.device == META
    suffix = run_suffix(model, run, 1, 5, read_at=prompts.position("last") - 5)
    assert suffix.device == META and suffix.shape == (4, model.cfg.d_vocab)


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_path_patching_runs_through_a_split_model(split, method):
    model, _, tok, vocab = split
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, 8, 7, seed=3)
    senders = [(0, 1), (1, 2), (2, 0), (3, 3)]  # two on each device (all 16 cost the reference ~20 s)
    direct = et.path_patch(
        model, clean, corrupt, "last", senders=senders, metric=_on_last_device, method=method, settings=S
    )
    assert direct.scores.shape == (4, 4)
    # Receivers on both devices, of every input kind, at other positions than the senders'.
    receivers = [(1, 0, "q", "last"), (3, 1, "k", "query_label"), (2, 2, "v", "last")]
    through = et.path_patch(
        model,
        clean,
        corrupt,
        "prev_query_label",
        receivers=receivers,
        senders=senders,
        metric=_on_last_device,
        method=method,
        settings=S,
    )
    assert through.scores.shape == (4, 4)


def test_position_sweep_runs_through_a_split_model(split):
    model, _, tok, vocab = split
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, 8, 7, seed=3)
    result = et.sweep(model, clean, corrupt, ["last", "query_label"], metric=_on_last_device, settings=S)
    assert set(result.positions) == {"last", "query_label"}


@pytest.mark.parametrize("restart", [True, False], ids=["resume", "full"])
def test_dcm_masks_take_gradients_through_a_split_model(split, restart):
    model, _, tok, vocab = split
    splits = desiderata.draw_splits(data.positional, vocab, (8, 4, 4), 7, seed=0)
    pairs = desiderata.tokenize_pairs(tok, splits.train)
    heads = [(0, 1), (2, 3), (3, 0)]  # on both devices
    prepared = dcm.prepare_pairs(model, pairs, "last", heads, run=restart)
    mask = torch.full((len(heads),), 0.5, requires_grad=True)
    with frozen(model):
        logits = dcm.masked_logits(model, heads, mask, prepared)
        assert logits.device == META
        logits.sum().backward()
    assert mask.grad is not None and mask.grad.shape == mask.shape


def test_cmap_patches_between_models_on_different_devices(split):
    base, source, tok, vocab = split
    assert {block_device(source, i) for i in range(4)} == {META}
    prompts = data.make_prompts(tok, data.sample_prompts(vocab, 4, 3, seed=1))
    circuit = et.Circuit({"a": [(1, 2), (3, 0)]}, {"a": ["last"]})
    for patch in ("z", "q"):
        logits = cross_model_logits(base, source, prompts, site_masks(circuit, patch, 4, 4))
        assert logits.device == META and logits.shape[:2] == prompts.input_ids.shape


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_mean_ablation_runs_through_a_split_model(split, method):
    model, _, tok, vocab = split
    prompts = data.make_prompts(tok, data.sample_prompts(vocab, 4, 3, seed=2))
    means = position_means(model, prompts, settings=S)
    circuit = et.Circuit({"a": [(0, 1), (3, 2)]}, {"a": ["last", "query_label"]})
    rows = list(ablated_last_logits(model, [circuit], prompts, means, settings=S, method=method))
    assert rows and all(logits.device == META for _, _, logits in rows)


def test_each_rank_splits_over_its_own_gpus(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device() == "cuda:3" and local_device(2) == "cuda:6"


def test_split_needs_gpus(tiny_dir):
    with pytest.raises(SetupError, match="needs CUDA GPUs"):
        models.load(tiny_dir, device="cpu", n_devices=2)


def test_split_layout_is_consecutive_layers_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    cfg = HookedTransformerConfig(
        d_model=8, d_head=2, n_layers=6, n_ctx=8, d_vocab=10, act_fn="relu", device="cuda:2", n_devices=3
    )
    assert [str(d) for d in models.block_devices(cfg)] == ["cuda:2"] * 2 + ["cuda:3"] * 2 + ["cuda:4"] * 2
    with pytest.raises(SetupError, match="cuda:6..cuda:8, but this machine has 8"):
        models.check_split("cuda:6", 3, 32)
    with pytest.raises(SetupError, match="more devices than the model's 2 layers"):
        models.check_split("cuda", 3, 2)
