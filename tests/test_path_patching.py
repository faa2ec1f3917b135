"""Path patching: the fast method equals the reference (1e-5, fp32) on every step, the
reference follows the paper's semantics, and the step files resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from et_circuits import data, models
from et_circuits import path_patching as pp
from et_circuits.circuit import CircuitError
from et_circuits.data import DataError
from et_circuits.hooks import hook_name, logits_at, patch_hooks
from tests.conftest import make_checkpoint

# Receivers spread over the layers of a 4-layer model, so every step has reachable and
# unreachable senders.
RECEIVERS = {
    "value_fetcher": [],
    "pos_transmitter": [(3, 0), (2, 1)],
    "pos_detector": [(2, 0), (3, 2)],
    "struct_reader": [(1, 1), (3, 3)],
}
STEP = {s.group: s for s in pp.STEPS}



def _scaled_model(path, n_kv_heads=None, dtype=torch.float32):
    """A 4-layer random LLaMA with weights scaled up so that heads have visible effects."""
    make_checkpoint(path, n_layers=4, n_heads=4, n_kv_heads=n_kv_heads, d_model=32, seed=1)
    model, tok, _ = models.load(path, device="cpu", dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(10)
    return model, tok


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def scaled(request, tmp_path_factory):
    model, tok = _scaled_model(tmp_path_factory.mktemp("scaled"), request.param)
    vocab = data.vocabulary(tok, min_labels=8)
    clean, corrupt = pp.prompts(tok, vocab, 20, 7, seed=3)
    return model, tok, clean, corrupt


@pytest.mark.parametrize("group", list(RECEIVERS))
def test_fast_equals_reference(scaled, group):
    model, _, clean, corrupt = scaled
    step = STEP[group]
    fast = pp.step_scores(model, clean, corrupt, step, RECEIVERS[group], "fast", batch_size=6, progress=False)
    ref = pp.step_scores(model, clean, corrupt, step, RECEIVERS[group], "reference", batch_size=6, progress=False)
    assert fast.shape == (4, 4) and not fast.isnan().any()
    assert ref.abs().max() > 1e-4  # the comparison is not between zeros (10x the tolerance)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    if step.receiver_kind is not None:  # a sender at or above every receiver cannot reach one
        top = max(layer for layer, _ in RECEIVERS[group])
        assert (fast[top:] == 0).all()
        assert ref[top:].abs().max() < 1e-6


def test_prepare_corrupt_runs_start_at_the_first_change(scaled):
    """The corrupt runs restart from the clean prefix at their first changed token; the heads
    they read equal those of whole corrupt forwards."""
    model, _, clean, corrupt = scaled
    start = pp._first_change(clean, corrupt)
    assert (start > 0).all() and len(start.unique()) > 1  # the prefix shortcut is exercised
    assert torch.equal(start, clean.position("prev_query_label"))  # where the corruption starts
    runs = pp.prepare(model, clean, corrupt, batch_size=6, progress=False)
    with pp.per_head_values(model), torch.no_grad():
        _, cache = model.run_with_cache(corrupt.input_ids)
    for where in pp.SENDER_POSITIONS:
        for layer in range(model.cfg.n_layers):
            whole = cache[hook_name("z", layer)][torch.arange(len(clean)), clean.position(where)]
            torch.testing.assert_close(runs.corrupt_z[where][layer], whole, atol=1e-5, rtol=1e-5)


def test_fast_runs_in_bfloat16(tmp_path):
    """The dtype of 7B runs on a GPU: the fast method's caches, prefix runs and patches keep
    bf16 (run here on CPU) and give the reference's scores within bf16 rounding."""
    model, tok = _scaled_model(tmp_path, n_kv_heads=2, dtype=torch.bfloat16)
    clean, corrupt = pp.prompts(tok, data.vocabulary(tok, min_labels=8), 12, 7, seed=3)
    runs = pp.prepare(model, clean, corrupt, batch_size=6, progress=False)
    assert runs.keys[0].dtype == runs.corrupt_z["last"][0].dtype == torch.bfloat16
    for group, receivers in RECEIVERS.items():
        step = STEP[group]
        fast = pp.step_scores(model, clean, corrupt, step, receivers, "fast", batch_size=6, progress=False, runs=runs)
        ref = pp.step_scores(model, clean, corrupt, step, receivers, "reference", batch_size=6, progress=False)
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(fast, ref, atol=1e-3, rtol=0)


def test_fast_small_tiles_equal_reference(scaled):
    """Few rows per pass: sender groups split inside a layer and across prompt chunks."""
    model, _, clean, corrupt = scaled
    step = STEP["struct_reader"]
    receivers = RECEIVERS["struct_reader"]
    small = pp.step_scores(model, clean, corrupt, step, receivers, "fast", max_rows=7, progress=False)
    ref = pp.step_scores(model, clean, corrupt, step, receivers, "reference", batch_size=20, progress=False)
    torch.testing.assert_close(small, ref, atol=1e-5, rtol=1e-5)


def test_identical_corruption_scores_zero(scaled):
    model, _, clean, _ = scaled
    for method in pp.METHODS:
        for group in ("value_fetcher", "struct_reader"):
            s = pp.step_scores(model, clean, clean, STEP[group], RECEIVERS[group], method, progress=False)
            assert s.abs().max() < 1e-5, (method, group)


def test_last_layer_sender_is_a_direct_patch(scaled):
    """Step 1 for a last-layer head needs no freezing: it equals patching its corrupt hook_z
    at the last token of a clean run (an independent check of the semantics)."""
    model, _, clean, corrupt = scaled
    layer, head = 3, 2
    scores = pp.step_scores(model, clean, corrupt, STEP["value_fetcher"], senders=[(layer, head)], progress=False)
    assert scores.isnan().sum() == 15 and not scores[layer, head].isnan()
    with torch.no_grad(), pp.per_head_values(model):
        _, cache = model.run_with_cache(corrupt.input_ids, names_filter=hook_name("z", layer))
        bad = cache[hook_name("z", layer)][torch.arange(len(clean)), clean.last]
        weights = torch.zeros(4, 4, dtype=torch.bool)
        weights[layer, head] = True
        patched = model.run_with_hooks(clean.input_ids, fwd_hooks=patch_hooks("z", {layer: bad}, clean.last, weights))
        base = model(clean.input_ids)
    rows = torch.arange(len(clean))
    prob = lambda logits: torch.softmax(logits_at(logits, clean.last), -1)[rows, clean.answer]  # noqa: E731
    expected = (prob(patched).mean() - prob(base).mean()) / prob(base).mean()  # ratio of means
    torch.testing.assert_close(scores[layer, head], expected, atol=1e-6, rtol=1e-5)


def test_gqa_restores_grouping(scaled):
    model = scaled[0]
    grouped = model.cfg.n_key_value_heads is not None
    assert model.cfg.ungroup_grouped_query_attention is False
    with pp.per_head_values(model):
        assert model.cfg.ungroup_grouped_query_attention is grouped
    assert model.cfg.ungroup_grouped_query_attention is False


def test_bad_input_is_refused(scaled):
    model, tok, clean, corrupt = scaled
    with pytest.raises(CircuitError, match="unknown path-patching method"):
        pp.step_scores(model, clean, corrupt, STEP["value_fetcher"], method="magic")
    with pytest.raises(CircuitError, match="receivers"):
        pp.step_scores(model, clean, corrupt, STEP["pos_transmitter"], [])
    with pytest.raises(CircuitError, match="no receivers"):
        pp.step_scores(model, clean, corrupt, STEP["value_fetcher"], [(1, 1)])
    with pytest.raises(CircuitError, match="outside the model"):
        pp.step_scores(model, clean, corrupt, STEP["pos_transmitter"], [(9, 0)])
    with pytest.raises(DataError, match="pairs"):
        pp.step_scores(model, clean, corrupt[:5], STEP["value_fetcher"])
    vocab = data.vocabulary(tok)
    longer = data.make_batch(tok, data.sample_prompts(vocab, len(clean), 8, 0))
    with pytest.raises(DataError, match="pairs"):
        pp.step_scores(model, clean, longer, STEP["value_fetcher"])


def test_top_heads_and_cap():
    scores = torch.tensor([[0.5, -0.2, float("nan")], [-0.9, -0.2, 0.0]])
    assert pp.top_heads(scores, 3) == [(1, 0), (0, 1), (1, 1)]  # tie: lower layer first
    assert pp.top_heads(scores, 6)[-1] == (0, 2)  # NaN (not a sender) comes last
    assert pp.effective_top_k(pp.PAPER_TOP_K, 32, 32) == (20, 5, 10, 5)
    assert pp.effective_top_k(pp.PAPER_TOP_K, 4, 4) == (4, 4, 4, 4)
    assert pp.effective_top_k((20, 1, 10, 5), 2, 2) == (1, 1, 1, 1)
    with pytest.raises(CircuitError):
        pp.effective_top_k((1, 2, 3), 4, 4)
    with pytest.raises(CircuitError):
        pp.effective_top_k((1, 2, 3, 0), 4, 4)


def test_prompts_are_seeded_and_aligned(tiny, vocab):
    _, tok = tiny
    a_clean, a_corrupt = pp.prompts(tok, vocab, 12, 7, seed=5)
    b_clean, _ = pp.prompts(tok, vocab, 12, 7, seed=5)
    c_clean, _ = pp.prompts(tok, vocab, 12, 7, seed=6)
    assert torch.equal(a_clean.input_ids, b_clean.input_ids)
    assert not torch.equal(a_clean.input_ids, c_clean.input_ids)
    assert torch.equal(a_clean.last, a_corrupt.last) and torch.equal(a_clean.query_label, a_corrupt.query_label)
    assert (a_clean.answer != a_corrupt.answer).all()


def test_run_steps_saves_and_resumes(scaled, tmp_path, monkeypatch):
    model, _, clean, corrupt = scaled
    meta = {"model": "tiny", "seed": "3", "n": str(len(clean))}
    first = pp.run_steps(model, clean, corrupt, (3, 2, 2, 2), out_dir=tmp_path, metadata=meta, progress=False)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == sorted(f"{s.group}.safetensors" for s in pp.STEPS)
    saved, found = pp.load_scores(tmp_path / "pos_transmitter.safetensors")
    torch.testing.assert_close(saved, first["pos_transmitter"])
    assert found["seed"] == "3" and found["method"] == "fast"
    assert found["receivers"] == str(pp.top_heads(first["value_fetcher"], 3))

    calls = []
    real = pp.step_scores
    monkeypatch.setattr(pp, "step_scores", lambda *a, **k: calls.append(a[3].group) or real(*a, **k))
    again = pp.run_steps(model, clean, corrupt, (3, 2, 2, 2), out_dir=tmp_path, metadata=meta, progress=False)
    assert calls == []  # every step reused
    for group in first:
        assert torch.equal(first[group], again[group])
    # a different top-k for C changes D's receivers only: A-C are reused, D recomputed
    pp.run_steps(model, clean, corrupt, (3, 2, 1, 2), out_dir=tmp_path, metadata=meta, progress=False)
    assert calls == ["struct_reader"]
    # another seed in the metadata: everything recomputed
    pp.run_steps(model, clean, corrupt, (3, 2, 1, 2), out_dir=tmp_path, metadata={**meta, "seed": "4"}, progress=False)
    assert calls == ["struct_reader", *[s.group for s in pp.STEPS]]


def test_corrupt_score_file_is_an_error(tmp_path):
    bad = tmp_path / "value_fetcher.safetensors"
    bad.write_text("not a tensor file")
    with pytest.raises(CircuitError, match="not a path-patching score file"):
        pp.load_scores(bad)
    with pytest.raises(CircuitError, match="no path-patching scores"):
        pp.load_scores(tmp_path / "missing.safetensors")


def _organism_or_skip():
    try:
        models.resolve_dir(models.get_spec("organism-llama"))
    except models.SetupError:
        pytest.skip("organism-llama weights are not trained yet")
    model, tok, _ = models.load("organism-llama", device="cpu")
    return model, tok


@pytest.mark.slow
def test_fast_equals_reference_on_organism():
    model, tok = _organism_or_skip()
    vocab = data.vocabulary(tok, min_labels=8)
    clean, corrupt = pp.prompts(tok, vocab, 16, 7, seed=0)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    top_k = pp.effective_top_k(pp.PAPER_TOP_K, n_layers, n_heads)
    receivers: list = []
    for step, k in zip(pp.STEPS, top_k):
        fast = pp.step_scores(model, clean, corrupt, step, receivers, "fast", progress=False)
        ref = pp.step_scores(model, clean, corrupt, step, receivers, "reference", batch_size=16, progress=False)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        receivers = pp.top_heads(fast, k)


def test_7b_geometry_benchmark_runs_small():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_7b_geometry.py"
    spec = importlib.util.spec_from_file_location("bench_7b_geometry", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--small", "--n", "8", "--reference-senders", "2"])
    assert result["fast_s"] > 0 and result["reference_s"] > 0
    assert result["max_diff"] < 1e-5
