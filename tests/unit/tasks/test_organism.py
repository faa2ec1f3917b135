"""The committed model organism: loading through the registry, the Goat adapter merge, the
model card's numbers, and that the fine-tuning data never shows the box template."""

from __future__ import annotations

import json
import random
from functools import cache

import pytest
import torch

from et_circuits import models
from et_circuits.core.forward import measure
from et_circuits.core.settings import RunSettings
from et_circuits.tasks.entity_tracking import data
from et_circuits.tasks.entity_tracking.organism import train

WEIGHTS = models.ORGANISM_DIR  # shipped files: a test that needs them fails when they are missing
N_CHECK = 200  # prompts for the accuracy checks (the card uses 500)


@cache
def load(name: str):
    return models.load(name, device="cpu")


@cache
def card_accuracy() -> dict[str, float]:
    return json.loads((WEIGHTS / "training_log.json").read_text())["accuracy"]


@cache
def accuracy(name: str, n: int) -> float:
    model, tok, _ = load(name)
    batch = data.make_prompts(tok, data.sample_prompts(data.vocabulary(tok), n, 7, seed=0))
    return measure(model, batch, settings=RunSettings(batch_size=100, progress=False))


@pytest.mark.parametrize("name", models.ORGANISM)
def test_loads_through_registry(name):
    model, tok, spec = load(name)
    assert spec.name == name and spec.local_dir == WEIGHTS / name
    assert model.cfg.n_layers >= 4 and model.cfg.n_heads >= 4
    assert model.cfg.d_vocab == len(tok)
    assert (spec.local_dir / "tokenizer.json").exists()
    ids = tok("The apple is in Box F. Box F contains the").input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids


def test_goat_is_an_adapter_on_llama():
    spec = models.get_spec("organism-goat")
    assert spec.is_adapter and spec.base == "organism-llama"
    files = {p.name for p in spec.local_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    config = json.loads((spec.local_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_goat_merged_logits_equal_unmerged_peft():
    """In float64, so the comparison sees the merge rather than float32 rounding of logits of
    magnitude ~20 (HF keeps RMSNorm and rotary in float32 even then: ~3e-5 remains)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    merged, tok, spec = models.load("organism-goat", device="cpu", dtype=torch.float64)
    base = LlamaForCausalLM.from_pretrained(WEIGHTS / "organism-llama", dtype=torch.float64)
    peft = PeftModel.from_pretrained(base, spec.local_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    samples = data.sample_prompts(data.vocabulary(tok), 8, 7, seed=3)
    samples += [data.random_sample(random.Random(i), data.vocabulary(tok), 2 + i % 6) for i in range(8)]
    batch = data.make_prompts(tok, samples)
    with torch.no_grad():
        want = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = merged(batch.input_ids)
    mask = batch.attention_mask.bool()
    assert (got[mask] - want[mask]).abs().max().item() < 1e-4


def test_goat_differs_from_llama():
    goat, llama = load("organism-goat")[0], load("organism-llama")[0]
    w_goat, w_llama = goat.blocks[0].attn.W_Q, llama.blocks[0].attn.W_Q
    assert not torch.allclose(w_goat, w_llama)


def test_card_accuracies_reproduce():
    """The first N_CHECK of the card's 500 evaluation prompts: the card's numbers are the
    500-prompt accuracies, so the subset agrees within sampling error, and the full set exactly."""
    card = card_accuracy()
    for name in models.ORGANISM:
        assert abs(accuracy(name, N_CHECK) - card[name]) < 0.08, name
    assert accuracy("organism-llama", 500) == pytest.approx(card["organism-llama"], abs=0.004)


def test_finetunes_order_like_the_paper():
    """Goat and FLoat beat the base; Vicuna stays near it (as in the paper's Table 1)."""
    card = card_accuracy()
    assert 0.5 <= card["organism-llama"] <= 0.8
    acc = {name: accuracy(name, N_CHECK) for name in models.ORGANISM}
    assert acc["organism-goat"] > acc["organism-llama"] + 0.05
    assert acc["organism-float"] > acc["organism-llama"] + 0.05
    assert abs(acc["organism-vicuna"] - acc["organism-llama"]) < 0.1


def test_weights_fit_budget():
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    assert (WEIGHTS / "README.md").exists()


def test_finetuning_data_has_no_box_template():
    tok = train.organism_tokenizer()
    vocab = data.vocabulary(tok)
    rng = random.Random(0)
    for task in (train.program_task(vocab, 12), train.general_task(6)):
        for _ in range(50):
            text = "".join(piece for piece, _ in task(rng))
            assert "Box" not in text and "contains" not in text and " is in " not in text


def test_trainer_tokenizer_is_the_committed_one():
    """`make organism` must rebuild the vocabulary the committed weights were trained with."""
    from transformers import AutoTokenizer

    committed = AutoTokenizer.from_pretrained(WEIGHTS / "organism-llama")
    assert train.organism_tokenizer().get_vocab() == committed.get_vocab()


def test_base_training_detects_a_stalled_plateau():
    """A run that gains no curriculum level within the stall budget is given up, with its
    evaluations recorded (a few steps of the real recipe on a tiny budget)."""
    recipe = train.BaseRecipe(stall=(20, 20), eval_every=10)
    run = train.train_base(recipe, seed=0)
    assert run.outcome == "stalled" and run.capped_at is None
    assert [h["step"] for h in run.history] == [10, 20, 30]
    assert all(h["level"] == 2 and 0 <= h["acc7"] <= 1 for h in run.history)


def test_lora_finetune_job_saves_an_adapter(tmp_path):
    base = train.new_model(train.Arch(), train.organism_tokenizer(), seed=0)
    recipe = train.FinetuneRecipe(steps=2)
    record = train._finetune_job(
        "organism-goat", train.to_bytes(base.state_dict()), train.Arch(), recipe, tmp_path, position=0
    )
    assert record["steps"] == 2 and [h["step"] for h in record["history"]] == [0, 2]
    files = {p.name for p in (tmp_path / "organism-goat").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
