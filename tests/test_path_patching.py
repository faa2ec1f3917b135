"""Path patching: the fast method equals the reference (1e-5, fp32) on the paper's steps and on
randomised cases (q, k and v receivers, sender and receiver positions, position sets, GQA, each
metric, learned positional embeddings), the reference follows the semantics on a direct case,
the paper's recipe reproduces the scores of the code it replaced, and discovery resumes."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import et_circuits as et
from et_circuits import models
from et_circuits.methods import path_patching as pp
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.core.errors import CircuitError, DataError
from et_circuits.core.hooks import hook_name, logits_at, patch_hooks
from et_circuits.core.settings import RunSettings
from et_circuits.pipeline.results import load_scores, step_files
from et_circuits.core.types import Receiver
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from tests.conftest import make_checkpoint
from et_circuits.core.prepared import _first_change
from et_circuits.methods import discovery

FIXTURES = Path(__file__).parent / "fixtures" / "organism-llama-path-patching"
S = RunSettings(batch_size=6, progress=False)
STEP = {s.group: s for s in PAPER_STEPS}
# Receivers of a 4-layer model, spread over the layers so that every step has reachable and
# unreachable senders.
RECEIVERS = {
    "value_fetcher": [],
    "pos_transmitter": [(3, 0), (2, 1)],
    "pos_detector": [(2, 0), (3, 2)],
    "struct_reader": [(1, 1), (3, 3)],
}


def _receivers(group):
    return discovery.step_receivers(STEP[group], RECEIVERS[group])


def _scaled_model(path, n_kv_heads=None, dtype=torch.float32):
    """A 4-layer random LLaMA with weights scaled up so that heads have visible effects."""
    make_checkpoint(path, n_layers=4, n_heads=4, n_kv_heads=n_kv_heads, d_model=32, seed=1)
    model, tok, _ = models.load(path, device="cpu", dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(10)
    return model, tok


def _with_wrong_answers(clean, corrupt):
    """Logit-difference prompts: the wrong answer of a clean prompt is its corrupt answer."""
    return clean.replace(wrong_answers=corrupt.answers), corrupt


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def scaled(request, tmp_path_factory):
    model, tok = _scaled_model(tmp_path_factory.mktemp("scaled"), request.param)
    vocab = data.vocabulary(tok, min_labels=8)
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, 20, 7, seed=3)
    return model, tok, clean, corrupt


@pytest.mark.parametrize("group", list(RECEIVERS))
def test_paper_steps_fast_equals_reference(scaled, group):
    model, _, clean, corrupt = scaled
    step = STEP[group]
    kwargs = dict(receivers=_receivers(group) or None, settings=S)
    fast = pp.path_patch(model, clean, corrupt, step.position, **kwargs)
    ref = pp.path_patch(model, clean, corrupt, step.position, method="reference", **kwargs)
    assert fast.shape == (4, 4) and not fast.isnan().any()
    assert ref.abs().max() > 1e-3  # the comparison is not between zeros (100x the tolerance)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    if step.receiver_kind is not None:  # a sender at or above every receiver cannot reach one
        top = max(layer for layer, _ in RECEIVERS[group])
        assert (fast[top:] == 0).all()
        assert ref[top:].abs().max() < 1e-6


def _random_case(rng: random.Random):
    """A sender position, distinct receivers (kind and position drawn at random, sometimes at a
    position the senders do not reach; none only for senders at the last position, whose
    direct effect is read) and a metric."""
    positions = ["last", "query_label", "prev_query_label", "labels+1", "objects"]
    sender = rng.choice(positions)
    receivers = set()
    for _ in range(rng.randint(0 if sender == "last" else 1, 3)):
        at = sender if rng.random() < 0.7 else rng.choice(positions)
        receivers.add(Receiver(rng.randrange(1, 4), rng.randrange(4), rng.choice("qkv"), at))
    metric = rng.choice([None, et.logit_diff])
    return sender, sorted(receivers) or None, metric


@pytest.mark.parametrize("case", range(12))
def test_random_cases_fast_equals_reference(scaled, case):
    model, _, clean, corrupt = scaled
    sender, receivers, metric = _random_case(random.Random(case))
    clean, corrupt = _with_wrong_answers(clean, corrupt)
    args = (model, clean, corrupt, sender, receivers, metric)
    fast = pp.path_patch(*args, settings=S)
    ref = pp.path_patch(*args, method="reference", settings=S)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_random_cases_are_not_all_zero(scaled):
    """Most drawn cases have effects well above the tolerance (so the test above tests)."""
    model, _, clean, corrupt = scaled
    clean, corrupt = _with_wrong_answers(clean, corrupt)
    largest = [
        pp.path_patch(model, clean, corrupt, *_random_case(random.Random(case)), settings=S).abs().max()
        for case in range(12)
    ]
    assert sum(x > 1e-4 for x in largest) >= 10  # 10x the tolerance


def test_a_receiver_keeps_its_frozen_input_where_other_patches_move_it(tmp_path):
    """Receivers off the sender positions are held at their (clean) frozen-run input, which
    blocks what the other receivers' patches would change there: adding such receivers changes
    the scores, and the fast method agrees (float64, so the small effect stands clear of
    rounding)."""
    model, tok = _scaled_model(tmp_path, dtype=torch.float64)
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 20, 7, seed=3)
    through_v = [Receiver(2, 2, "v", "labels+1")]
    blocked = through_v + [Receiver(3, h, kind, "labels") for h in range(4) for kind in "kv"]
    one = pp.path_patch(model, clean, corrupt, "labels+1", through_v, method="reference", settings=S)
    two = pp.path_patch(model, clean, corrupt, "labels+1", blocked, method="reference", settings=S)
    assert (one - two).abs().max() > 2e-5
    fast = pp.path_patch(model, clean, corrupt, "labels+1", blocked, settings=S)
    torch.testing.assert_close(fast, two, atol=1e-6, rtol=0)


def test_metric_and_relative(scaled):
    """The default is the relative change of the mean answer probability; a passed metric is
    absolute unless asked; relative = absolute / metric(clean)."""
    model, _, clean, corrupt = scaled
    rel = pp.path_patch(model, clean, corrupt, "last", settings=S)
    absolute = pp.path_patch(model, clean, corrupt, "last", metric=et.answer_prob, settings=S)
    with torch.no_grad():
        p_clean = et.answer_prob(et.last_logits(model, clean), clean).item()
    torch.testing.assert_close(rel, absolute / p_clean, atol=1e-5, rtol=1e-4)
    again = pp.path_patch(model, clean, corrupt, "last", metric=et.answer_prob, relative=True, settings=S)
    torch.testing.assert_close(again, rel, atol=1e-6, rtol=1e-6)


def test_prepare_corrupt_runs_start_at_the_first_change(scaled):
    """The corrupt runs restart from the clean prefix at their first changed token; the heads
    they read equal those of whole corrupt forwards."""
    model, _, clean, corrupt = scaled
    positions = [s.position for s in PAPER_STEPS]
    start = _first_change(clean, corrupt, positions)
    assert (start > 0).all() and len(start.unique()) > 1  # the prefix shortcut is exercised
    assert torch.equal(start, clean.position("prev_query_label"))  # where the corruption starts
    runs = pp.prepare_runs(model, clean, corrupt, positions, S)
    with pp.per_head_values(model), torch.no_grad():
        _, cache = model.run_with_cache(corrupt.input_ids)
    for where in positions:
        for layer in range(model.cfg.n_layers):
            whole = cache[hook_name("z", layer)][torch.arange(len(clean)), clean.position(where)]
            torch.testing.assert_close(runs.corrupt_z[where][layer][:, 0], whole, atol=1e-5, rtol=1e-5)


def test_fast_runs_in_bfloat16(tmp_path):
    """The dtype of 7B runs on a GPU: the fast method's caches, prefix runs and patches keep
    bf16 (run here on CPU) and give the reference's scores within bf16 rounding, relative to
    each step's largest score."""
    model, tok = _scaled_model(tmp_path, n_kv_heads=2, dtype=torch.bfloat16)
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 12, 7, seed=3)
    runs = pp.prepare_runs(model, clean, corrupt, [s.position for s in PAPER_STEPS], S)
    assert runs.run.keys[0].dtype == runs.corrupt_z["last"][0].dtype == torch.bfloat16
    for group in RECEIVERS:
        step = STEP[group]
        receivers = _receivers(group) or None
        fast = pp.path_patch(model, clean, corrupt, step.position, receivers, settings=S, runs=runs)
        ref = pp.path_patch(model, clean, corrupt, step.position, receivers, method="reference", settings=S)
        scale = ref.abs().max()
        assert scale > 1e-3
        torch.testing.assert_close(fast, ref, atol=0.02 * scale.item(), rtol=0)


def test_fast_small_tiles_equal_reference(scaled):
    """Few rows per pass: sender groups split inside a layer and across prompt chunks."""
    model, _, clean, corrupt = scaled
    receivers = _receivers("struct_reader")
    small = pp.path_patch(model, clean, corrupt, "prev_query_label", receivers, settings=RunSettings(6, 7, False))
    ref = pp.path_patch(model, clean, corrupt, "prev_query_label", receivers, method="reference", settings=RunSettings(20, progress=False))
    torch.testing.assert_close(small, ref, atol=1e-5, rtol=1e-5)


def test_identical_corruption_scores_zero(scaled):
    model, _, clean, _ = scaled
    for method in pp.METHODS:
        for group in ("value_fetcher", "struct_reader"):
            s = pp.path_patch(model, clean, clean, STEP[group].position, _receivers(group) or None, method=method, settings=S)
            assert s.abs().max() < 1e-5, (method, group)


def test_last_layer_sender_is_a_direct_patch(scaled):
    """Step 1 for a last-layer head needs no freezing: it equals patching its corrupt hook_z
    at the last token of a clean run (an independent check of the semantics)."""
    model, _, clean, corrupt = scaled
    layer, head = 3, 2
    scores = pp.path_patch(model, clean, corrupt, "last", senders=[(layer, head)], settings=S)
    assert scores.isnan().sum() == 15 and not scores[layer, head].isnan()
    last = clean.position("last")
    with torch.no_grad(), pp.per_head_values(model):
        _, cache = model.run_with_cache(corrupt.input_ids, names_filter=hook_name("z", layer))
        bad = cache[hook_name("z", layer)][torch.arange(len(clean)), last]
        weights = torch.zeros(4, 4, dtype=torch.bool)
        weights[layer, head] = True
        patched = model.run_with_hooks(clean.input_ids, fwd_hooks=patch_hooks("z", {layer: bad}, last, weights))
        base = model(clean.input_ids)
    rows = torch.arange(len(clean))
    prob = lambda logits: torch.softmax(logits_at(logits, last), -1)[rows, clean.answers]  # noqa: E731
    expected = (prob(patched).mean() - prob(base).mean()) / prob(base).mean()  # ratio of means
    torch.testing.assert_close(scores[layer, head], expected, atol=1e-6, rtol=1e-5)


def test_learned_positional_embeddings(vocab):
    """A GPT-2-style model (learned absolute positions, LayerNorm, biases): the fast method's
    corrupt runs add the positional embeddings of their offset, so it equals the reference."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=128, d_head=8, n_heads=4, d_vocab=len(tok), act_fn="gelu",
        positional_embedding_type="standard", normalization_type="LN", seed=0,
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(3)  # sizeable head effects
        model.pos_embed.W_pos.mul_(3)  # and positions that matter
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 12, 7, seed=3)
    for position, receivers in [("last", None), ("prev_query_label", [Receiver(2, 1, "v", "prev_query_label")])]:
        fast = pp.path_patch(model, clean, corrupt, position, receivers, settings=S)
        ref = pp.path_patch(model, clean, corrupt, position, receivers, method="reference", settings=S)
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


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
        pp.path_patch(model, clean, corrupt, "last", method="magic")
    with pytest.raises(CircuitError, match="receiver input"):
        pp.path_patch(model, clean, corrupt, "last", [Receiver(1, 1, "z", "last")])
    with pytest.raises(CircuitError, match="outside the model"):
        pp.path_patch(model, clean, corrupt, "last", [Receiver(9, 0, "q", "last")])
    with pytest.raises(DataError, match="unknown position"):
        pp.path_patch(model, clean, corrupt, "S2")
    with pytest.raises(DataError, match="pairs"):
        pp.path_patch(model, clean, corrupt[:5], "last")
    longer = data.make_prompts(tok, data.sample_prompts(data.vocabulary(tok), len(clean), 8, 0))
    with pytest.raises(DataError, match="pairs"):
        pp.path_patch(model, clean, longer, "last")
    runs = pp.prepare_runs(model, clean, corrupt, ["last"], S)
    with pytest.raises(CircuitError, match="do not cover"):
        pp.path_patch(model, clean, corrupt, "query_label", runs=runs)
    with pytest.raises(DataError, match="wrong_answers"):
        pp.path_patch(model, clean, corrupt, "last", metric=et.logit_diff, settings=S)


def test_top_heads_and_cap():
    scores = torch.tensor([[0.5, -0.2, float("nan")], [-0.9, -0.2, 0.0]])
    assert pp.top_heads(scores, 3) == [(1, 0), (0, 1), (1, 1)]  # tie: lower layer first
    assert (0, 2) not in pp.top_heads(scores, 6) and len(pp.top_heads(scores, 6)) == 5  # NaN: not a sender
    assert discovery.effective_top_k(recipe.PAPER_TOP_K, 32, 32) == (20, 5, 10, 5)
    assert discovery.effective_top_k(recipe.PAPER_TOP_K, 4, 4) == (4, 4, 4, 4)
    assert discovery.effective_top_k((20, 1, 10, 5), 2, 2) == (1, 1, 1, 1)
    with pytest.raises(CircuitError):
        discovery.effective_top_k((1, 2, 3, 0), 4, 4)


def test_prompts_are_seeded_and_aligned(tiny, vocab):
    _, tok = tiny
    a_clean, a_corrupt = recipe.path_patching_prompts(tok, vocab, 12, 7, seed=5)
    b_clean, _ = recipe.path_patching_prompts(tok, vocab, 12, 7, seed=5)
    c_clean, _ = recipe.path_patching_prompts(tok, vocab, 12, 7, seed=6)
    assert torch.equal(a_clean.input_ids, b_clean.input_ids)
    assert not torch.equal(a_clean.input_ids, c_clean.input_ids)
    for name in ("last", "query_label"):
        assert torch.equal(a_clean.position(name), a_corrupt.position(name))
    assert (a_clean.answers != a_corrupt.answers).all()


def test_find_circuit_saves_and_resumes(scaled, tmp_path, monkeypatch):
    """Through the circuit stage's step files: every step written with its receivers; a rerun
    reuses every step; another top-k for B recomputes only C; another seed everything."""
    model, _, clean, corrupt = scaled
    meta = {"model": "tiny", "seed": "3", "n": str(len(clean))}

    def run(top_k, meta):
        return discovery.find_circuit(model, clean, corrupt, top_k, PAPER_STEPS, settings=S, **dict(zip(("finished", "on_step"), step_files(tmp_path, meta, "fast"))))

    first, scores = run((3, 2, 2, 2), meta)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == sorted(f"{s.group}.safetensors" for s in PAPER_STEPS)
    saved, found = load_scores(tmp_path / "pos_transmitter.safetensors")
    torch.testing.assert_close(saved, scores["pos_transmitter"])
    assert found["seed"] == "3" and found["method"] == "fast"
    assert found["receivers"] == str(pp.top_heads(scores["value_fetcher"], 3))
    assert first.positions == {s.group: s.position for s in PAPER_STEPS}
    assert first.groups["value_fetcher"] == pp.top_heads(scores["value_fetcher"], 3)

    calls = []
    real = discovery.path_patch
    monkeypatch.setattr(discovery, "path_patch", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    again, rescored = run((3, 2, 2, 2), meta)
    assert calls == []  # every step reused
    assert again.groups == first.groups
    assert all(torch.allclose(scores[g], rescored[g], atol=0, rtol=0, equal_nan=True) for g in scores)
    fewer, _ = run((3, 1, 2, 2), meta)  # another top-k for B: C recomputed, D only if C's heads changed
    changed = fewer.groups["pos_detector"] != first.groups["pos_detector"]
    assert calls == ["query_label", *(["prev_query_label"] if changed else [])]
    calls.clear()
    run((3, 1, 2, 2), {**meta, "seed": "4"})  # another seed in the metadata: everything recomputed
    assert calls == [s.position for s in PAPER_STEPS]


def test_corrupt_score_file_is_an_error(tmp_path):
    bad = tmp_path / "value_fetcher.safetensors"
    bad.write_text("not a tensor file")
    with pytest.raises(CircuitError, match="not a path-patching score file"):
        load_scores(bad)
    with pytest.raises(CircuitError, match="no path-patching scores"):
        load_scores(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def organism():
    model, tok, _ = models.load("organism-llama", device="cpu")
    return model, tok


@pytest.mark.slow
def test_organism_recipe_reproduces_the_scores_of_the_replaced_code(organism):
    """The paper's four steps on organism-llama (300 prompts, seed 0, top-k 4 per step) give the
    step A and B scores that the code before the task-neutral refactor computed (committed under
    tests/fixtures), and A and B are the heads README reports. Since then a group is chosen only
    among the senders that can reach its receivers: B's among layer 0 (below A's top layer), so
    C's senders reach nothing (all scores 0, no head chosen) and D has no receivers (no score)."""
    model, tok = organism
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 300, 7, seed=0)
    circuit, scores = discovery.find_circuit(model, clean, corrupt, (4, 4, 4, 4), PAPER_STEPS, settings=RunSettings(progress=False))
    old = {g: load_scores(FIXTURES / f"{g}.safetensors")[0] for g in ("value_fetcher", "pos_transmitter")}
    for group, expected in old.items():
        torch.testing.assert_close(scores[group], expected, atol=1e-6, rtol=0)
    candidates = json.loads((FIXTURES / "minimality.json").read_text())["candidates"]["groups"]
    assert circuit.groups["value_fetcher"] == [tuple(h) for h in candidates["value_fetcher"]]
    assert circuit.groups["value_fetcher"][:3] == [(1, 2), (1, 3), (1, 1)]
    top_a = max(layer for layer, _ in circuit.groups["value_fetcher"])
    assert circuit.groups["pos_transmitter"] == pp.top_heads(old["pos_transmitter"], 4, [(l, h) for l in range(top_a) for h in range(4)])
    assert circuit.groups["pos_transmitter"][:2] == [(0, 1), (0, 0)]
    assert (scores["pos_detector"] == 0).all() and circuit.groups["pos_detector"] == []
    assert scores["struct_reader"].isnan().all() and circuit.groups["struct_reader"] == []


@pytest.mark.slow
def test_fast_equals_reference_on_organism(organism):
    model, tok = organism
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 16, 7, seed=0)
    previous: list = []
    for step, k in zip(PAPER_STEPS, (4, 4, 4, 4)):
        receivers = discovery.step_receivers(step, previous) or None
        fast = pp.path_patch(model, clean, corrupt, step.position, receivers, settings=S)
        ref = pp.path_patch(model, clean, corrupt, step.position, receivers, method="reference", settings=RunSettings(16, progress=False))
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        previous = pp.top_heads(fast, k)


def test_7b_geometry_benchmark_runs_small():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_7b_geometry.py"
    spec = importlib.util.spec_from_file_location("bench_7b_geometry", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--small", "--n", "6", "--reference-senders", "4", "--runs", "2"])
    first, second = result["runs"]
    assert result["speedup"] == (first["speedup"] + second["speedup"]) / 2  # the median of two
    for run in result["runs"]:
        assert run["fast_s"] > 0 and run["reference_s"] > 0
        assert min(run["largest"].values()) > 1e-4  # paper-like receivers: every step has effects
        assert run["max_diff"] < 1e-5
    assert first["sweep_s"] > 0 and 0 < first["sweep_share"]  # the position sweep runs once
    assert second["sweep_s"] != second["sweep_s"]  # NaN: not repeated
