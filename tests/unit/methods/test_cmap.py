"""CMAP: patching semantics pinned on tiny random LLaMAs, head-set selection, and the `CmapResult`
result type (the CLI stage: tests/integration/test_cmap_knockout_stages.py)."""

import copy
import json
import math

import pytest
import torch

from et_circuits import models
from et_circuits.core.errors import CircuitError, SetupError
from et_circuits.core.settings import RunSettings
from et_circuits.methods import cmap
from et_circuits.pipeline.results import check_dcm_matches, cmap_rows, selected_heads
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import paper_circuit
from tests.conftest import make_checkpoint

CIRCUIT = paper_circuit(
    {
        "value_fetcher": [(1, 0), (1, 2)],
        "pos_transmitter": [(0, 1)],
        "pos_detector": [(0, 3), (1, 1)],
        "struct_reader": [(0, 0)],
    }
)
# The layout `stages/dcm.py` writes (only the keys CMAP reads, plus a distractor section).
DCM = {
    "model": "organism-float",
    "base_circuit": {"groups": {"value_fetcher": {"object_value": {"heads": [[0, 0]]}}}},
    "own_circuit": {
        "group_heads": {g: [list(h) for h in hs] for g, hs in CIRCUIT.groups.items()},
        "groups": {
            "value_fetcher": {"object_value": {"heads": [[1, 2]]}, "positional": {"heads": [[1, 0]]}},
            "pos_transmitter": {"positional": {"heads": [[0, 1]]}, "object_value": {"heads": []}},
            "pos_detector": {"positional": {"heads": []}},
            "struct_reader": {"positional": {"heads": [[0, 0]]}},
        },
    },
}


def head_sets(circuit, dcm_result):
    """The paper's head sets from a dcm.json-shaped result, as the cmap stage builds them."""
    check_dcm_matches(circuit, dcm_result)
    return recipe.cmap_head_sets(circuit, selected_heads(dcm_result))


@pytest.fixture(scope="module")
def batch(tiny, vocab):
    return data.make_prompts(tiny[1], data.sample_prompts(vocab, 24, 3, seed=1))


@pytest.fixture(scope="module")
def qkv_twin(tiny):
    """A copy of the tiny model whose W_Q, W_K and W_V (only) are perturbed."""
    model = copy.deepcopy(tiny[0])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            for w in (block.attn.W_Q, block.attn.W_K, block.attn.W_V):
                w.add_(0.5 * torch.randn(w.shape, generator=generator))
    return model


def _every_position(batch, kinds):
    """`batch` with a position "p<i>" for every index i, and all-heads masks for every (kind,
    position)."""
    seq = batch.input_ids.shape[1]
    prompts = batch.replace(positions={f"p{i}": torch.full((len(batch),), i) for i in range(seq)})
    return prompts, {(kind, f"p{i}"): torch.ones(2, 4, dtype=torch.bool) for kind in kinds for i in range(seq)}


def test_patching_a_model_into_itself_changes_nothing(tiny, batch):
    model = tiny[0]
    with torch.no_grad():
        clean = model(batch.input_ids)
    prompts, masks = _every_position(batch, ("z", "q", "k", "v"))
    patched = cmap.cross_model_logits(model, model, prompts, masks)
    torch.testing.assert_close(patched, clean, atol=1e-5, rtol=0)

    variant_list = recipe.variants(head_sets(CIRCUIT, DCM), input_sets=["A", "full"])
    result = cmap.cmap(model, model, batch, variant_list, settings=RunSettings(batch_size=10, progress=False))
    assert result.source == result.base
    for v, acc in result.variants:
        if v.n_heads:
            assert acc == result.base, (v, acc)


def test_output_patching_everywhere_reproduces_the_source(tiny, qkv_twin, batch):
    """Y differs from X only in W_Q/W_K/W_V, so Y's head outputs at every position, fed through
    X's shared W_O and MLPs, make X compute exactly Y's residual stream."""
    x, y = tiny[0], qkv_twin
    with torch.no_grad():
        x_logits, y_logits = x(batch.input_ids), y(batch.input_ids)
    assert (x_logits - y_logits).abs().max() > 1e-2  # the twin really is different
    prompts, masks = _every_position(batch, ("z",))
    patched = cmap.cross_model_logits(x, y, prompts, masks)
    torch.testing.assert_close(patched, y_logits, atol=1e-5, rtol=0)


def test_input_patching_everywhere_reproduces_the_source(tiny, qkv_twin, batch):
    """Patching q, k and v of every head at every position gives Y's attention everywhere."""
    x, y = tiny[0], qkv_twin
    with torch.no_grad():
        y_logits = y(batch.input_ids)
    prompts, masks = _every_position(batch, ("q", "k", "v"))
    patched = cmap.cross_model_logits(x, y, prompts, masks)
    torch.testing.assert_close(patched, y_logits, atol=1e-5, rtol=0)
    # q alone at every position is not enough: keys and values still come from X
    prompts, masks = _every_position(batch, ("q",))
    q_only = cmap.cross_model_logits(x, y, prompts, masks)
    assert (q_only - y_logits).abs().max() > 1e-3


def test_patch_at_group_position_only_touches_that_position_onwards(tiny, qkv_twin, batch):
    """z patched at the query label leaves every earlier position's logits as the base's."""
    x, y = tiny[0], qkv_twin
    masks = cmap.site_masks(paper_circuit({"pos_detector": [(0, 1)]}), "z", 2, 4)
    assert list(masks) == [("z", "query_label")]
    patched = cmap.cross_model_logits(x, y, batch, masks)
    with torch.no_grad():
        clean = x(batch.input_ids)
    for b in range(len(batch)):
        p = int(batch.position("query_label")[b])
        torch.testing.assert_close(patched[b, :p], clean[b, :p], atol=1e-6, rtol=0)
        assert (patched[b, p] - clean[b, p]).abs().max() > 1e-4


def test_cmap_accuracy_matches_unbatched_reference(tiny, qkv_twin, batch):
    """The chunked, layer-resuming evaluation equals patching full forward passes; the answers
    are set to the twin's own predictions so the accuracies are not trivially zero."""
    x, y = tiny[0], qkv_twin
    with torch.no_grad():
        y_pred = y(batch.input_ids)[torch.arange(len(batch)), batch.position("last")].argmax(-1)
    b = batch.replace(answers=y_pred)
    variant_list = recipe.variants(head_sets(CIRCUIT, DCM), input_sets=["full"])
    result = cmap.cmap(x, y, b, variant_list, settings=RunSettings(batch_size=7, progress=False))
    assert result.source == 1.0
    last = b.position("last")
    seen = set()
    for v, acc in result.variants:
        if v.n_heads == 0:
            assert math.isnan(acc)
            continue
        masks = cmap.site_masks(v.heads, v.patch, 2, 4)
        logits = cmap.cross_model_logits(x, y, b, masks)
        expected = int((logits[torch.arange(len(b)), last].argmax(-1) == b.answers).sum()) / len(b)
        # float32 sums of per-chunk means (one prompt is 1/24 ~ 0.04, far above the tolerance)
        assert acc == pytest.approx(expected, abs=1e-6), v
        seen.add(round(acc, 6))
    assert len(seen) > 1  # the variants do differ, so the comparison is not vacuous


def test_geometry_mismatch_is_a_clear_error(tiny, tmp_path, batch):
    make_checkpoint(tmp_path, n_layers=3, n_heads=4)
    other, _, _ = models.load(tmp_path, device="cpu")
    with pytest.raises(SetupError, match="different geometry.*n_layers 2 vs 3"):
        cmap.cmap(tiny[0], other, batch, [])
    prompts, masks = _every_position(batch[:2], ("z",))
    with pytest.raises(SetupError, match="n_layers"):
        cmap.cross_model_logits(tiny[0], other, prompts, masks)


def test_gqa_refuses_key_value_patching(tmp_path):
    make_checkpoint(tmp_path, n_layers=2, n_heads=4, n_kv_heads=2)
    model, _, _ = models.load(tmp_path, device="cpu")
    for patch in ("k", "v", "qk", "qkv"):
        with pytest.raises(SetupError, match="grouped-query"):
            cmap.check_patch(model, patch)
    cmap.check_patch(model, "q")
    cmap.check_patch(model, "z")
    with pytest.raises(SetupError, match="unknown patch"):
        cmap.check_patch(model, "o")


def test_head_sets_follow_the_paper():
    sets = head_sets(CIRCUIT, DCM)
    assert sets["A"].groups == {"value_fetcher": [(1, 2)]} and sets["A"].positions_of("value_fetcher") == ("last",)
    assert sets["B"].groups == {"pos_transmitter": [(0, 1)]}
    assert sets["C"].groups == {"pos_detector": []}  # DCM selected none
    assert sets["D"].groups == {"struct_reader": [(0, 0)]}  # whole group, no DCM
    assert sets["full"].groups == CIRCUIT.groups
    assert recipe.cmap_head_sets(CIRCUIT, None)["A"].groups == {"value_fetcher": []}


def test_stale_or_malformed_dcm_is_a_circuit_error():
    smaller = paper_circuit({**CIRCUIT.groups, "struct_reader": []})
    with pytest.raises(CircuitError, match="different circuit"):
        head_sets(smaller, DCM)
    with pytest.raises(CircuitError, match="own_circuit"):
        head_sets(CIRCUIT, {"groups": DCM["own_circuit"]["groups"]})
    broken = {"own_circuit": {"groups": {"value_fetcher": {"positional": {"heads": [[1, 0]]}}}}}
    with pytest.raises(CircuitError, match="object_value heads for group 'value_fetcher'"):
        head_sets(CIRCUIT, broken)


def test_site_masks_merge_groups_sharing_a_position():
    masks = cmap.site_masks(CIRCUIT, "qk", 2, 4)
    assert set(masks) == {(k, p) for k in "qk" for p in ("last", "query_label", "prev_query_label")}
    last = masks[("q", "last")]
    assert last.sum() == 3 and last[1, 0] and last[1, 2] and last[0, 1]
    assert cmap.first_layer(masks) == 0
    assert cmap.first_layer({("z", "last"): last & (torch.arange(2)[:, None] == 1)}) == 1
    with pytest.raises(CircuitError, match="outside the model"):
        cmap.site_masks(paper_circuit({"value_fetcher": [(5, 0)]}), "z", 2, 4)


def test_empty_set_is_reported_not_patched(tiny, batch):
    variant_list = recipe.variants(head_sets(CIRCUIT, DCM), output_sets=["C", "D"], input_sets=[])
    result = cmap.cmap(tiny[0], tiny[0], batch, variant_list)
    rows = {r["set"]: r for r in cmap_rows(result, "ft", "base")}
    assert rows["C"]["accuracy"] is None and "no heads" in rows["C"]["note"]
    assert rows["D"]["accuracy"] == rows["D"]["base_accuracy"] and rows["D"]["note"] == ""
    with pytest.raises(CircuitError, match="unknown head set"):
        recipe.variants(head_sets(CIRCUIT, DCM), output_sets=["E"])


# ---------------------------------------------------------------------------------------------
# The result type


@pytest.fixture(scope="module")
def twin_result(tiny, qkv_twin, batch):
    """A real `CmapResult`: the twin patched into the tiny model for every head set (C empty: not
    patched, NaN) with z, and set A with every input patch kind."""
    variant_list = recipe.variants(head_sets(CIRCUIT, DCM), input_sets=["A"])
    return cmap.cmap(tiny[0], qkv_twin, batch, variant_list, settings=RunSettings(batch_size=10, progress=False))


def test_cmap_result_json_round_trip(twin_result):
    result = twin_result
    assert result.n == 24 and result.metric == "accuracy"
    assert any(math.isnan(v) for _, v in result.variants) and any(not math.isnan(v) for _, v in result.variants)
    d = result.to_json()
    text = json.dumps(d)
    assert "NaN" not in text  # an unpatched set is written as null
    back = cmap.CmapResult.from_json(json.loads(text))
    assert back.to_json() == d
    assert (back.base, back.source, back.n, back.metric) == (result.base, result.source, result.n, result.metric)
    for (v, value), (w, again) in zip(result.variants, back.variants, strict=True):
        assert w == v and w.heads == v.heads
        assert (math.isnan(value) and math.isnan(again)) or again == value


def test_cmap_result_frame(twin_result):
    result = twin_result
    frame = result.to_frame()
    assert list(frame.columns) == ["set", "patch", "n_heads", "value", "base", "source"]
    assert len(frame) == len(result.variants)  # one row per variant
    assert list(zip(frame["set"], frame["patch"])) == [(v.name, v.patch) for v, _ in result.variants]
    assert list(frame["n_heads"]) == [v.n_heads for v, _ in result.variants]
    for row, (_, value) in zip(frame.itertuples(), result.variants):
        assert (math.isnan(row.value) and math.isnan(value)) or row.value == value
    assert (frame["base"] == result.base).all() and (frame["source"] == result.source).all()


def test_cmap_result_repr(twin_result):
    result = twin_result
    text = repr(result)
    assert "\n" not in text and len(text) < 300 and "tensor" not in text and "Circuit" not in text
    assert text.startswith(f"CmapResult(accuracy: base {result.base:.3f}, source {result.source:.3f}, n=24; ")
    assert "C/z=nan" in text
    v, value = next((v, x) for v, x in result.variants if not math.isnan(x))
    assert f"{v.name}/{v.patch}={value:.3f}" in text
