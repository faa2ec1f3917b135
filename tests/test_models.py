import pytest
import torch
from transformers import LlamaForCausalLM

from et_circuits import models
from et_circuits.entity_tracking import data
from tests.conftest import make_checkpoint


def _prompts(tok, n=4, seed=0):
    return data.make_prompts(tok, data.sample_prompts(data.vocabulary(tok), n, 7, seed))


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_hooked_logits_match_hf(tmp_path, n_kv_heads):
    hf = make_checkpoint(tmp_path, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads)
    model, tok, _ = models.load(tmp_path, device="cpu")
    if n_kv_heads:
        assert model.cfg.n_key_value_heads == n_kv_heads
    batch = _prompts(tok)
    with torch.no_grad():
        ours = model(batch.input_ids)
        theirs = hf(batch.input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_config_comes_from_checkpoint(tmp_path):
    make_checkpoint(tmp_path, n_layers=3, n_heads=2, d_model=16)
    model, _, _ = models.load(tmp_path, device="cpu")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head) == (3, 2, 16, 8)
    assert model.cfg.d_mlp == 32 and model.cfg.rotary_base == 10000.0


def test_lora_merge_matches_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    hf = make_checkpoint(base_dir)
    lora = get_peft_model(
        hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    torch.manual_seed(1)
    with torch.no_grad():  # B is zero at init; make the adapter do something
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    lora.save_pretrained(adapter_dir)

    hf_model, tok = models.load_hf(base_dir, adapter=adapter_dir)
    merged = models.to_hooked(hf_model, tok)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    plain = models.to_hooked(*models.load_hf(base_dir))
    batch = _prompts(tok)
    with torch.no_grad():
        ours = merged(batch.input_ids)
        theirs = peft_model(batch.input_ids).logits
        unadapted = plain(batch.input_ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - unadapted).abs().max() > 1e-2, "the adapter must change the logits"


def test_registry_env_var_points_at_weights(tmp_path, monkeypatch):
    make_checkpoint(tmp_path)
    monkeypatch.setenv("ET_CIRCUITS_VICUNA_7B", str(tmp_path))
    model, _, spec = models.load("vicuna-7b", device="cpu")
    assert spec.name == "vicuna-7b" and model.cfg.n_layers == 2


def test_models_dir_var(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "float-7b")
    monkeypatch.setenv("ET_CIRCUITS_MODELS", str(tmp_path))
    assert models.resolve_dir(models.get_spec("float-7b")) == tmp_path / "float-7b"


def test_missing_weights_message_names_every_place(monkeypatch, tmp_path):
    monkeypatch.delenv("ET_CIRCUITS_LLAMA_7B", raising=False)
    monkeypatch.setenv("ET_CIRCUITS_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.SetupError) as e:
        models.load("llama-7b", device="cpu")
    msg = str(e.value)
    for part in ("ET_CIRCUITS_LLAMA_7B", str(tmp_path / "llama-7b"), "huggyllama/llama-7b"):
        assert part in msg


def test_not_llama_is_setup_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(models.SetupError, match="gpt2"):
        models.load(tmp_path, device="cpu")
