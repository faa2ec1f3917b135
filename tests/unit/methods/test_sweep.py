"""The position sweep: its layer and head scores against activation patching written plainly
with TransformerLens hooks, its path scores against `path_patch`, anchored and absolute
positions, where it finds the organism's mechanism, and the `Sweep` result type."""

import json

import pytest
import torch

import et_circuits as et
from et_circuits.methods import sweep as ps
from et_circuits.tasks.entity_tracking import data, recipe
from tests.planted import scaled_llama

QUIET = et.RunSettings(batch_size=8, progress=False)


def patched_answer_prob(model, clean, corrupt, spec, layer, heads):
    """Oracle: the clean run with `heads` of `layer` taking, at `spec`, the z of the corrupt run
    (read at the clean prompts' positions); relative change of the mean answer probability."""
    name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(corrupt.input_ids, names_filter=name)
        at = clean.position_set(spec)
        rows = torch.arange(len(clean))[:, None].expand_as(at)

        def patch(act, hook):
            act = act.clone()
            for h in heads:
                act[rows, at, h] = cache[name][rows, at, h]
            return act

        def prob(logits):
            return torch.softmax(logits[torch.arange(len(clean)), clean.position("last")], -1)[
                torch.arange(len(clean)), clean.answers
            ].mean()

        p_clean = prob(model(clean.input_ids))
        p = prob(model.run_with_hooks(clean.input_ids, fwd_hooks=[(name, patch)]))
    return ((p - p_clean) / p_clean).item()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model, tok = scaled_llama(tmp_path_factory.mktemp("sweep"))
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 12, 7, seed=3)
    specs = ["labels+1", "prev_query_label", "query_label", "last"]
    return model, clean, corrupt, specs, ps.sweep(model, clean, corrupt, specs, mark=0.2, settings=QUIET)


def test_layer_and_head_scores_equal_plain_activation_patching(case):
    model, clean, corrupt, specs, sweep = case
    assert sweep.positions == specs and sweep.layers.shape == (4, 4)
    for i, spec in enumerate(specs):
        for layer in range(4):
            expected = patched_answer_prob(model, clean, corrupt, spec, layer, range(4))
            assert sweep.layers[i, layer].item() == pytest.approx(expected, abs=1e-5)
    assert sweep.layers.abs().max() > 0.01  # 1000x the tolerance
    assert sweep.marked and all(s in specs for s in sweep.marked)
    assert list(sweep.heads) == list(sweep.paths) == ps.smallest(sweep, clean) != []
    for spec in sweep.heads:
        for layer, head in [(0, 1), (2, 3), (3, 0)]:
            expected = patched_answer_prob(model, clean, corrupt, spec, layer, [head])
            assert sweep.heads[spec][layer, head].item() == pytest.approx(expected, abs=1e-5)


def test_path_scores_are_path_patching_through_every_later_reader(case):
    model, clean, corrupt, _, sweep = case
    spec = sweep.marked[0]
    readers = [et.Receiver(l, h, k, spec) for l in range(1, 4) for h in range(4) for k in "qkv"]
    expected = et.path_patch(model, clean, corrupt, spec, receivers=readers, method="reference", settings=QUIET)
    torch.testing.assert_close(sweep.paths[spec], expected.scores, atol=1e-5, rtol=1e-5)


def test_unmarked_positions_are_weaker(case):
    _, _, _, specs, sweep = case
    strength = dict(zip(specs, sweep.layers.abs().amax(1).tolist()))
    weakest_marked = min(strength[s] for s in sweep.marked)
    assert all(strength[s] < weakest_marked for s in specs if s not in sweep.marked)


def test_absolute_positions_need_one_layout(case):
    model, clean, corrupt, _, _ = case
    every = ps.sweep(model, clean[:4], corrupt[:4], settings=QUIET)
    assert every.positions == [f"t{i}" for i in range(clean.seq_len)] and len(every.tokens) == clean.seq_len
    assert every.tokens[0] == "<s>" and case[4].tokens[case[3].index("last")] == "the"
    ragged = clean[:2].replace(attention_mask=torch.tensor([[1] * clean.seq_len, [1] * (clean.seq_len - 1) + [0]]))
    with pytest.raises(et.DataError, match="one length"):
        ps.absolute_positions(ragged)


# ---------------------------------------------------------------------------------------------
# The result type


def test_sweep_json_round_trip(case):
    """to_json -> from_json -> to_json gives the same JSON (scores rounded to 6 decimals), and the
    read-back scores are the sweep's within that rounding."""
    sweep = case[4]
    d = sweep.to_json()
    back = ps.Sweep.from_json(json.loads(json.dumps(d)))
    assert back.to_json() == d
    assert back.positions == sweep.positions and back.marked == sweep.marked and back.tokens == sweep.tokens
    assert list(back.heads) == list(sweep.heads) and list(back.paths) == list(sweep.paths) != []
    torch.testing.assert_close(back.layers, sweep.layers.float(), atol=1e-6, rtol=0)
    for spec in sweep.heads:
        torch.testing.assert_close(back.heads[spec], sweep.heads[spec].float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(back.paths[spec], sweep.paths[spec].float(), atol=1e-6, rtol=0)


def test_sweep_frame(case):
    _, _, _, specs, sweep = case
    frame = sweep.to_frame()
    assert list(frame.columns) == ["position", "token", "layer", "score", "marked"]
    assert len(frame) == len(specs) * 4  # one row per (position, layer)
    for row in frame.itertuples():
        i = specs.index(row.position)
        assert row.score == pytest.approx(sweep.layers[i, row.layer].item())
        assert row.marked == (row.position in sweep.marked) and row.token == sweep.tokens[i]


def test_sweep_repr(case):
    sweep = case[4]
    text = repr(sweep)
    assert "\n" not in text and len(text) < 300 and "tensor" not in text
    assert text.startswith("Sweep(4 positions x 4 layers; marked: ")
    assert all(spec in text for spec in sweep.marked) and "head sweeps at: " in text


@pytest.mark.slow
def test_the_organism_binds_after_the_label():
    """On organism-llama the sweep marks the tokens after the queried label and the last token,
    not the label tokens themselves (the lexical mechanism README describes)."""
    model, tok, _ = et.load("organism-llama", device="cpu")
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 60, 7, seed=0)
    specs = ["prev_query_label", "prev_query_label+1", "prev_query_label+2", "labels+2", "query_label", "last"]
    sweep = ps.sweep(model, clean, corrupt, specs, mark=0.2, settings=QUIET)
    assert set(sweep.marked) == {"prev_query_label+1", "prev_query_label+2", "labels+2", "last"}
    # every segment's label+2 carries no more than the queried one's: no head sweeps there
    assert set(sweep.heads) == {"prev_query_label+1", "prev_query_label+2", "last"}
    assert set(et.top_heads(sweep.paths["prev_query_label+2"], 2)) == {(0, 0), (0, 1)}
